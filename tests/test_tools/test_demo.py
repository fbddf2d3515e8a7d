"""tools/demo: the synthetic datasets (ADE20K layout, COCO json), chance levels, and the demo."""
import glob
import json
import os.path as osp
import re
import sys

import cv2
import numpy as np
import pytest
from tool_helpers import TOOLS, load_tool, run_script, synthetic

RING_CHANNEL = {2: 0, 3: 1, 4: 2}  # PNG class value -> dominant RGB channel of its ring


def _dominant_ring_channel(image_rgb, blob_mask, outside=True):
    """Dominant colour channel of the saturated pixels just outside (inside) ``blob_mask``."""
    kernel = np.ones((5, 5), np.uint8)
    mask = blob_mask.astype(np.uint8)
    if outside:
        around = cv2.dilate(mask, kernel).astype(bool) & ~blob_mask
    else:
        around = blob_mask & ~cv2.erode(mask, kernel).astype(bool)
    pixels = image_rgb[around].astype(np.int32)
    saturated = pixels[(pixels.max(1) - pixels.min(1)) > 100]
    assert len(saturated) > 0, 'no ring pixels around a blob'
    return int(np.bincount(saturated.argmax(1), minlength=3).argmax())


def test_seg_dataset_layout_and_semantics(tmp_path):
    syn = synthetic()
    root = str(tmp_path / 'a')
    assert syn.make_seg_dataset(root, num_train=5, num_val=3, size=64, seed=7) == {
        'training': 5, 'validation': 3}
    for split, num in (('training', 5), ('validation', 3)):
        images = sorted(glob.glob(osp.join(root, 'images', split, '*.jpg')))
        labels = sorted(glob.glob(osp.join(root, 'annotations', split, '*.png')))
        assert len(images) == len(labels) == num
        assert [osp.basename(p)[:-4] for p in images] == [osp.basename(p)[:-4] for p in labels]
    # Deterministic per seed.
    again = str(tmp_path / 'b')
    syn.make_seg_dataset(again, num_train=5, num_val=3, size=64, seed=7)
    for path in glob.glob(osp.join(root, 'annotations', '*', '*.png')):
        other = path.replace(root, again)
        np.testing.assert_array_equal(cv2.imread(path, -1), cv2.imread(other, -1))

    # ADE20K semantics: 1 background, 2..4 blobs (0 unlabelled: the rings with
    # ring_label='ignore'); a blob's class is the colour of its ring, read from the image.
    ignore_root = str(tmp_path / 'c')
    syn.make_seg_dataset(ignore_root, num_train=2, num_val=2, size=64, seed=7,
                         ring_label='ignore')
    checked, leaks = 0, [0, 0]
    for base, outside in ((root, False), (ignore_root, True)):
        for path in glob.glob(osp.join(base, 'annotations', '*', '*.png')):
            label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            assert label.dtype == np.uint8 and label.shape == (64, 64)
            assert set(np.unique(label)) <= ({0, 1, 2, 3, 4} if outside else {1, 2, 3, 4})
            assert (label == 1).mean() > 0.5 and (label == 0).any() == outside
            image = cv2.imread(path.replace('annotations', 'images')[:-4] + '.jpg')[..., ::-1]
            count, comps = cv2.connectedComponents((label >= 2).astype(np.uint8))
            for comp in range(1, count):
                blob = comps == comp
                values = np.unique(label[blob])
                assert len(values) == 1
                channel = _dominant_ring_channel(image, blob, outside)
                assert channel == RING_CHANNEL[int(values[0])]
                checked += 1
                if not outside:
                    # The context pixels of a blob see no ring colour within their 5x5 patch.
                    hidden = syn.context_mask(label) & blob
                    assert hidden.any()
                    rgb = image.astype(np.int32)
                    colourful = (rgb.max(-1) - rgb.min(-1)) > 60
                    seen = cv2.dilate(colourful.astype(np.uint8), np.ones((5, 5), np.uint8))
                    leaks[0] += int((seen.astype(bool) & hidden).sum())
                    leaks[1] += int(hidden.sum())
    assert checked >= 10
    # (JPEG chroma subsampling may leak a little colour inward.)
    assert leaks[0] <= 0.02 * leaks[1], leaks

    with pytest.raises(ValueError, match='size must be >= 32'):
        syn.render_sample(np.random.default_rng(0), 16)
    with pytest.raises(ValueError, match='ring_label'):
        syn.render_sample(np.random.default_rng(0), 64, ring_label='blob')


def test_det_dataset_coco_json(tmp_path):
    syn = synthetic()
    root = str(tmp_path)
    counts = syn.make_det_dataset(root, num_train=4, num_val=2, size=64, seed=3)
    from pycocotools.coco import COCO
    for split, num in (('train', 4), ('val', 2)):
        path = osp.join(root, 'annotations', f'instances_{split}.json')
        coco = COCO(path)
        assert len(coco.getImgIds()) == num
        assert len(coco.getAnnIds()) == counts[split] >= num
        assert sorted(coco.getCatIds()) == [1, 2, 3]
        with open(path) as f:
            ann_ids = [a['id'] for a in json.load(f)['annotations']]
        assert len(set(ann_ids)) == len(ann_ids)
        for img in coco.loadImgs(coco.getImgIds()):
            image = cv2.imread(osp.join(root, 'images', split, img['file_name']))[..., ::-1]
            assert image.shape == (64, 64, 3)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=img['id'])):
                x, y, w, h = ann['bbox']
                assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 8 and h > 8
                # The box's border rows hold the ring, whose colour is the category.
                crop = image[int(y) + 1:int(y + h) - 1, int(x) + 1:int(x + w) - 1]
                yy, xx = np.mgrid[0:crop.shape[0], 0:crop.shape[1]]
                cy, cx = (crop.shape[0] - 1) / 2, (crop.shape[1] - 1) / 2
                inner = np.hypot(yy - cy, xx - cx) < min(crop.shape[:2]) / 2 - 3
                assert _dominant_ring_channel(crop, inner) == ann['category_id'] - 1


def test_chance_levels_against_simulation():
    syn = synthetic()
    rng = np.random.default_rng(0)
    labels = [syn.render_sample(rng, 64)[1] for _ in range(6)]
    levels = syn.chance_levels(labels)
    flat = np.concatenate([x.ravel() for x in labels]).astype(int)
    valid = flat > 0
    gt = flat[valid] - 1

    def miou(pred):
        ious = []
        for c in range(4):
            inter = np.sum((pred == c) & (gt == c))
            union = np.sum((pred == c) | (gt == c))
            if union > 0:
                ious.append(inter / union)
        return float(np.mean(ious))

    sims = [miou(rng.integers(0, 4, gt.size)) for _ in range(20)]
    assert abs(np.mean(sims) - levels['uniform']) < 0.01
    counts = np.bincount(gt, minlength=4)
    assert abs(miou(np.full(gt.size, counts.argmax())) - levels['majority']) < 1e-9
    top = 1 + counts[1:].argmax()
    context_free = np.where(gt == 0, 0, top)
    assert abs(miou(context_free) - levels['context_free']) < 1e-9
    # With context masks only the masked pixels are forced to one class.
    masks = [syn.context_mask(x) for x in labels]
    hidden = np.concatenate([m.ravel() for m in masks])[valid]
    pred = gt.copy()
    pred[hidden] = np.bincount(gt[hidden]).argmax()
    with_masks = syn.chance_levels(labels, context_masks=masks)['context_free']
    assert abs(miou(pred) - with_masks) < 1e-9
    assert levels['context_free'] < with_masks < 1.0
    with pytest.raises(ValueError, match='no labelled pixel'):
        syn.chance_levels([np.zeros((4, 4), np.uint8)])


# mmengine's log lines as tools/train.py and tools/test.py write them.
TRAIN_LINE = ('12/05 14:36:01 - mmengine - INFO - Iter(train) [ 4/12]  base_lr: 1.7778e-03 lr: '
              '1.7778e-03  eta: 0:00:24  time: 3.0619  data_time: 0.0211  loss: 1.2695  '
              'decode.loss_ce: 1.2695  decode.acc_seg: 81.8390')
VAL_LINE = ('12/05 14:36:15 - mmengine - INFO - Iter(val) [1/1]    aAcc: 84.3500  mIoU: 21.0900  '
            'mAcc: 25.0000  data_time: 0.0037  time: 0.4543')
OPS_LINE = ("12/05 14:35:48 - mmengine - INFO - mmboat ops (cpu, float32): neighborhood attention "
            "-> compiled CPU kernels (mmboat._ext); reason: impl 'auto' (MMBOAT_OPS_IMPL unset)")


def test_progress_lines():
    demo = load_tool('demo/run_demo.py')
    assert demo.progress_line(TRAIN_LINE) == 'iter  4/12  loss 1.2695  eta 0:00:24'
    assert demo.progress_line(VAL_LINE) == 'validation: aAcc 84.3500  mIoU 21.0900  mAcc 25.0000'
    assert demo.progress_line(VAL_LINE.replace('Iter(val)', 'Iter(test)')).startswith('metrics:')
    assert demo.progress_line(OPS_LINE) == OPS_LINE[OPS_LINE.index('mmboat ops'):]
    for quiet in ('Config:', "crop_size = (64, 64)", 'Iter(val) [ 5/40]    eta: 0:00:02',
                  'UserWarning: ... is deprecated', '    dist_cfg: {}'):
        assert demo.progress_line(quiet) is None, quiet
    assert demo.fmt_seconds(75.4) == '1m15s' and demo.fmt_seconds(0) == '0m00s'


def test_run_tool_keeps_the_full_log_in_the_file(tmp_path, capsys):
    demo = load_tool('demo/run_demo.py')
    script = tmp_path / 'fake_tool.py'
    script.write_text('import sys, warnings\n'
                      'print("Config:\\ncrop_size = (64, 64)")\n'
                      'warnings.warn("old API", DeprecationWarning)\n'
                      f'print({TRAIN_LINE!r})\n'
                      f'print({OPS_LINE!r}); print({OPS_LINE!r})\n'
                      'sys.exit(int(sys.argv[1]))\n')
    log_path = str(tmp_path / 'tool.log')
    demo.run_tool(demo.Log(), 'train', [str(script), '0'], log_path)
    console = capsys.readouterr().out.splitlines()
    assert [re.sub(r'^\[demo \d\d:\d\d\] ', '', line) for line in console] == [
        'train   iter  4/12  loss 1.2695  eta 0:00:24',
        'train   ' + OPS_LINE[OPS_LINE.index('mmboat ops'):]]  # once, though logged twice
    with open(log_path) as f:
        text = f.read()
    assert text.startswith(f'$ {sys.executable} {script} 0\n')
    for expected in ('crop_size = (64, 64)', 'DeprecationWarning: old API', TRAIN_LINE):
        assert expected in text
    with pytest.raises(RuntimeError, match=r'fake_tool.py failed with exit code 3 \(full log'):
        demo.run_tool(demo.Log(), 'test', [str(script), '3'], log_path)
    console = capsys.readouterr().out
    assert 'failed with exit code 3; the last lines of' in console
    assert '    | crop_size = (64, 64)' in console  # the log's tail, shown on failure


@pytest.mark.slow
def test_demo_quick_run(tmp_path):
    work_dir = str(tmp_path / 'demo')
    proc = run_script([osp.join(TOOLS, 'demo', 'run_demo.py'), '--quick', '--work-dir',
                       work_dir, '--setup-seconds', '5'], env={'MMBOAT_NUM_THREADS': '2'})
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = proc.stdout.strip().splitlines()
    tail = lines[-13:]
    assert any('mIoU on 8 validation images' in line for line in tail)
    assert any('chance level' in line for line in tail)
    with open(osp.join(work_dir, 'result.json')) as f:
        result = json.load(f)
    assert 0 <= result['mIoU'] <= 100 and result['quick']
    picture = cv2.imread(result['picture'])
    assert picture is not None and picture.shape[0] > picture.shape[1]
    assert result['picture'] in '\n'.join(tail)

    # A compact console: progress lines per phase, iterations of training, a summary; the full
    # logs (environment, config dumps, warnings) in the work dir.
    assert len(lines) < 40, proc.stdout
    progress = [line for line in lines if line.startswith('[demo ')]
    phases = [line.split('] ', 1)[1].split()[0] for line in progress]
    assert phases[0] == 'data' and phases[-1] == 'picture'
    assert set(phases) == {'data', 'train', 'test', 'picture'}
    assert [line.split('iter ')[1].split()[0] for line in progress
            if 'train   iter' in line] == ['4/12', '8/12', '12/12']
    assert any('mmboat ops (cpu' in line or 'mmboat ops (cuda' in line for line in progress)
    for noise in ('Config:', 'Runtime environment', 'Warning', 'crop_size'):
        assert noise not in proc.stdout, noise
    for tool in ('train', 'test'):
        log_path = result['logs'][tool]
        assert log_path in '\n'.join(tail) and osp.dirname(log_path) == work_dir
        with open(log_path) as f:
            text = f.read()
        assert 'Config:' in text and 'Runtime environment' in text
    summary = next(line for line in tail if 'time per phase' in line)
    assert re.fullmatch(r'  time per phase: setup 0m05s, data \dm\d\ds, train \dm\d\ds, '
                        r'test \dm\d\ds, picture \dm\d\ds', summary), summary
    assert list(result['phase_seconds']) == ['setup', 'data', 'train', 'test', 'picture']
    assert result['phase_seconds']['train'] > 0


@pytest.mark.slow
def test_demo_full_run_beats_chance(tmp_path):
    """The main job: the trained NAT UperNet must use context (ring colours)."""
    work_dir = str(tmp_path / 'demo')
    proc = run_script([osp.join(TOOLS, 'demo', 'run_demo.py'), '--work-dir', work_dir],
                      env={'MMBOAT_NUM_THREADS': '2'}, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:]
    with open(osp.join(work_dir, 'result.json')) as f:
        result = json.load(f)
    # Far above chance, and right on the blob interiors, which only context can classify.
    assert result['mIoU'] > 3 * result['chance_uniform'], result
    assert result['mIoU'] > result['chance_majority'] + 40, result
    assert result['context_accuracy'] > result['context_blind'] + 25, result
