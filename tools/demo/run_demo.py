"""mmboat's main job: train and evaluate a NAT UperNet on a synthetic context-dependent dataset.

    python tools/demo/run_demo.py [--work-dir work_dirs/demo] [--quick]

Phases (``tools/demo.sh`` runs ``tools/setup_env.sh`` first, the ``setup`` phase); each prints
compact progress lines with the elapsed time, while the tools' full logs go to the work dir:

1. ``data``: write a synthetic segmentation set in ADE20K layout (tools/demo/synthetic.py):
   identically textured blobs whose class is the colour of a ring around them, so only a model
   that looks beyond a pixel's neighbourhood can classify blob interiors;
2. ``train``: train a UperNet with a NAT-Mini-width backbone (configs/_demo_/) through
   tools/train.py (a line per logged iteration; full log: ``<work dir>/train.log``);
3. ``test``: evaluate the saved checkpoint through tools/test.py (mmseg's IoUMetric; full log:
   ``<work dir>/test.log``);
4. ``picture``: save ``predictions.png`` (image | ground truth | prediction for a few validation
   images) in the work dir,

then a summary: the mIoU next to the chance levels, the time per phase and where the logs are.

Runs on CPU in about five minutes on 2 cores (``--quick``: well under a minute, for tests).
"""
import argparse
import collections
import glob
import json
import os
import os.path as osp
import re
import shlex
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import cv2
import numpy as np

HERE = osp.dirname(osp.abspath(__file__))
ROOT = osp.dirname(osp.dirname(HERE))
sys.path.insert(0, HERE)

import synthetic  # noqa: E402

DEFAULT_CONFIG = osp.join(ROOT, 'configs', '_demo_',
                          'nat-mini-slim_upernet_1xb8-600i_synthseg-64x64.py')
# (train images, val images, iterations, log interval)
FULL = dict(num_train=240, num_val=40, iters=600, log_interval=50)
QUICK = dict(num_train=32, num_val=8, iters=12, log_interval=4)


class Log:
    """Prints ``[demo mm:ss] message`` lines, flushed at once (``offset``: seconds already spent,
    e.g. in ``tools/setup_env.sh``)."""

    def __init__(self, offset: float = 0.) -> None:
        self.start = time.time() - offset

    def elapsed(self) -> str:
        return fmt_seconds(time.time() - self.start)

    def __call__(self, msg: str) -> None:
        sec = int(time.time() - self.start)
        print(f'[demo {sec // 60:02d}:{sec % 60:02d}] {msg}', flush=True)


def fmt_seconds(seconds: float) -> str:
    """75.2 -> ``'1m15s'``."""
    sec = int(round(seconds))
    return f'{sec // 60:d}m{sec % 60:02d}s'


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--work-dir', default='work_dirs/demo', help='output directory')
    parser.add_argument('--quick', action='store_true',
                        help='a few iterations on a few images (a smoke run, not a result)')
    parser.add_argument('--config', default=DEFAULT_CONFIG, help='demo config')
    parser.add_argument('--iters', type=int, default=None, help='override training iterations')
    parser.add_argument('--seed', type=int, default=0, help='dataset and training seed')
    parser.add_argument('--num-show', type=int, default=6,
                        help='validation images in predictions.png')
    parser.add_argument('--setup-seconds', type=float, default=None,
                        help='time tools/demo.sh spent in tools/setup_env.sh (for the summary)')
    return parser.parse_args(argv)


def _short(path: str) -> str:
    """``path`` relative to the current directory when it lies below it."""
    if osp.isabs(path) and path.startswith(os.getcwd() + os.sep):
        return osp.relpath(path, os.getcwd())
    return path


# mmengine's LoggerHook lines: ``... - INFO - Iter(train) [ 50/600]  lr: ...  eta: 0:03:10 ...``
_ITER_LINE = re.compile(r'Iter\((train|val|test)\) *\[ *(\d+)/(\d+)\](.*)')


def progress_line(line: str) -> Optional[str]:
    """The compact console form of a tool's log line worth showing, or None.

    Shown: training iterations (loss, eta), the validation/test metrics line and mmboat's
    ``mmboat ops (...)`` line (which implementation the ops run on).
    """
    match = _ITER_LINE.search(line)
    if match is None:
        ops = line.find('mmboat ops (')
        return line[ops:].strip() if ops >= 0 else None
    kind, step, total, rest = match.groups()
    fields = dict(re.findall(r'(\w[\w.]*): (\S+)', rest))
    if kind == 'train':
        text = f'iter {int(step):{len(total)}d}/{total}'
        for key in ('loss', 'eta'):
            if key in fields:
                text += f'  {key} {fields[key]}'
        return text
    if 'mIoU' in fields:
        return f'{"validation" if kind == "val" else "metrics"}: ' + '  '.join(
            f'{key} {fields[key]}' for key in ('aAcc', 'mIoU', 'mAcc') if key in fields)
    return None


def run_tool(log: Log, phase: str, argv: List[str], log_path: str,
             show: Callable[[str], Optional[str]] = progress_line) -> None:
    """Run a tools/*.py script with its whole output (configs, warnings, every log line) in
    ``log_path``; the lines that ``show`` turns into text are printed as ``phase`` progress."""
    cmd = [sys.executable] + argv
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env['PYTHONPATH'] = ROOT + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
    tail: collections.deque = collections.deque(maxlen=30)
    shown = set()
    with open(log_path, 'w') as f:
        f.write('$ ' + ' '.join(shlex.quote(a) for a in cmd) + '\n')
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors='replace', bufsize=1)
        for line in proc.stdout:
            f.write(line)
            tail.append(line.rstrip('\n'))
            text = show(line)
            if text and text not in shown:
                shown.add(text)
                log(f'{phase:<7} {text}')
        returncode = proc.wait()
    if returncode != 0:
        log(f'{phase:<7} {osp.basename(argv[0])} failed with exit code {returncode}; the last '
            f'lines of {_short(log_path)}:')
        print('\n'.join('    | ' + line for line in tail), flush=True)
        raise RuntimeError(f'{osp.basename(argv[0])} failed with exit code {returncode} (full '
                           f'log: {log_path})')


def read_test_metrics(test_dir: str) -> Dict[str, float]:
    """The metrics json that mmengine's LoggerHook writes after testing (newest run)."""
    files = sorted(glob.glob(osp.join(test_dir, '*', '*.json')), key=osp.getmtime)
    for path in reversed(files):
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        for record in reversed(lines):
            if 'mIoU' in record:
                return record
    raise RuntimeError(f'no mIoU found in the test logs under {test_dir}')


def colorize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """ADE20K-convention label map (0 unlabelled) to RGB; unlabelled is black."""
    table = np.concatenate([np.zeros((1, 3), np.uint8), palette.astype(np.uint8)], 0)
    return table[np.clip(label, 0, len(table) - 1)]


def save_predictions_png(path: str, data_root: str, pred_dir: str, num: int) -> str:
    """Save rows of image | ground truth | prediction for the first ``num`` validation images."""
    palette = np.array(synthetic.SEG_PALETTE)
    names = sorted(osp.splitext(osp.basename(p))[0]
                   for p in glob.glob(osp.join(pred_dir, '*.png')))[:num]
    if not names:
        raise RuntimeError(f'no predicted label maps in {pred_dir}')
    rows = []
    for name in names:
        image = cv2.imread(osp.join(data_root, 'images', 'validation', name + '.jpg'))
        gt = cv2.imread(osp.join(data_root, 'annotations', 'validation', name + '.png'),
                        cv2.IMREAD_UNCHANGED)
        pred = cv2.imread(osp.join(pred_dir, name + '.png'), cv2.IMREAD_UNCHANGED)
        gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
        gt_bgr, pred_bgr = colorize(gt, palette)[..., ::-1], colorize(pred, palette)[..., ::-1]
        rows.append(np.concatenate([image, gap, gt_bgr, gap, pred_bgr], 1))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows[:-1], 0)
    scale = max(1, 256 // grid.shape[1] * 2)
    grid = cv2.resize(grid, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    header = np.full((28, grid.shape[1], 3), 255, np.uint8)
    third = grid.shape[1] // 3
    for i, text in enumerate(('image', 'ground truth', 'prediction')):
        cv2.putText(header, text, (i * third + 6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55,
                    (0, 0, 0), 1, cv2.LINE_AA)
    if not cv2.imwrite(path, np.concatenate([header, grid], 0)):
        raise OSError(f'could not write {path}')
    return path


def context_accuracy(data_root: str, pred_dir: str) -> Dict[str, float]:
    """Accuracy on the blob pixels that need context (:func:`synthetic.context_mask`).

    Returns:
        dict: ``accuracy`` of the predictions there and ``blind``, the best accuracy without
        context (the most frequent class among those pixels), both in percent, and ``pixels``.
    """
    gts, preds = [], []
    for path in sorted(glob.glob(osp.join(pred_dir, '*.png'))):
        name = osp.basename(path)
        gt = cv2.imread(osp.join(data_root, 'annotations', 'validation', name),
                        cv2.IMREAD_UNCHANGED)
        mask = synthetic.context_mask(gt)
        gts.append(gt[mask])
        preds.append(cv2.imread(path, cv2.IMREAD_UNCHANGED)[mask])
    gt, pred = np.concatenate(gts), np.concatenate(preds)
    if gt.size == 0:
        raise RuntimeError(f'no context pixels found for the predictions in {pred_dir}')
    return dict(accuracy=100.0 * float(np.mean(gt == pred)),
                blind=100.0 * float(np.bincount(gt).max() / gt.size), pixels=int(gt.size))


def main(argv: Optional[List[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    log = Log(args.setup_seconds or 0.)
    preset = QUICK if args.quick else FULL
    iters = args.iters or preset['iters']
    work_dir = osp.abspath(args.work_dir)
    data_root = osp.join(work_dir, 'data', 'synthseg')
    train_dir, test_dir = osp.join(work_dir, 'train'), osp.join(work_dir, 'test')
    pred_dir = osp.join(test_dir, 'pred')
    logs = dict(train=osp.join(work_dir, 'train.log'), test=osp.join(work_dir, 'test.log'))
    os.makedirs(work_dir, exist_ok=True)
    phases: Dict[str, float] = {}  # phase -> seconds
    if args.setup_seconds is not None:
        phases['setup'] = args.setup_seconds
    phase_start = time.time()

    def end_phase(name: str) -> None:
        nonlocal phase_start
        phases[name] = time.time() - phase_start
        phase_start = time.time()

    log(f'{"data":<7} writing {preset["num_train"]} train + {preset["num_val"]} val 64x64 images '
        f'(ADE20K layout) to {_short(data_root)}')
    synthetic.make_seg_dataset(data_root, preset['num_train'], preset['num_val'], 64,
                               seed=args.seed)
    val_labels = [cv2.imread(p, cv2.IMREAD_UNCHANGED) for p in sorted(
        glob.glob(osp.join(data_root, 'annotations', 'validation', '*.png')))]
    chance = synthetic.chance_levels(val_labels, context_masks=[
        synthetic.context_mask(label) for label in val_labels])
    end_phase('data')

    options = [f'{loader}.dataset.data_root={data_root}'
               for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')]
    options += [f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
                f'param_scheduler.1.end={iters}', f'default_hooks.checkpoint.interval={iters}',
                f'default_hooks.logger.interval={preset["log_interval"]}',
                f'randomness.seed={args.seed}']
    if args.quick:
        options += ['param_scheduler.0.end=2', 'param_scheduler.1.begin=2']
    log(f'{"train":<7} {osp.relpath(args.config, ROOT)}, {iters} iterations on CPU with '
        f'tools/train.py (full log: {_short(logs["train"])})')
    run_tool(log, 'train', [osp.join(ROOT, 'tools', 'train.py'), args.config, '--work-dir',
                            train_dir, '--cfg-options'] + options, logs['train'])
    checkpoint = osp.join(train_dir, f'iter_{iters}.pth')
    if not osp.isfile(checkpoint):
        raise RuntimeError(f'training finished without writing {checkpoint} (see '
                           f'{logs["train"]})')
    end_phase('train')

    log(f'{"test":<7} {_short(checkpoint)} with tools/test.py (full log: '
        f'{_short(logs["test"])})')
    run_tool(log, 'test', [osp.join(ROOT, 'tools', 'test.py'), args.config, checkpoint,
                           '--work-dir', test_dir, '--out', pred_dir, '--cfg-options'] + options,
             logs['test'])
    metrics = read_test_metrics(test_dir)
    end_phase('test')

    log(f'{"picture":<7} image | ground truth | prediction for {args.num_show} validation images')
    picture = save_predictions_png(osp.join(work_dir, 'predictions.png'), data_root, pred_dir,
                                   args.num_show)
    miou = float(metrics['mIoU'])
    context = context_accuracy(data_root, pred_dir)
    end_phase('picture')
    result = dict(mIoU=miou, chance_uniform=100 * chance['uniform'],
                  chance_majority=100 * chance['majority'],
                  context_free=100 * chance['context_free'],
                  context_accuracy=context['accuracy'], context_blind=context['blind'])
    with open(osp.join(work_dir, 'result.json'), 'w') as f:
        json.dump(dict(result, checkpoint=checkpoint, picture=picture, iters=iters,
                       quick=args.quick, phase_seconds=phases, logs=logs), f, indent=2)
    print('', flush=True)
    print('=' * 72)
    print(f'mmboat demo finished in {log.elapsed()}' + (' (--quick smoke run: the metric '
                                                        'means nothing)' if args.quick else ''))
    print('  time per phase: ' + ', '.join(f'{name} {fmt_seconds(sec)}'
                                           for name, sec in phases.items()))
    print(f'  mIoU on {preset["num_val"]} validation images:   {miou:6.2f} %')
    print(f'  chance level, uniform random guess: {result["chance_uniform"]:6.2f} %')
    print(f'  chance level, majority class:       {result["chance_majority"]:6.2f} %')
    print(f'  context-blind oracle:               {result["context_free"]:6.2f} %  (every pixel '
          'right except blob interiors, which get one class)')
    print(f'  blob interiors ({context["pixels"]} px that cannot see their ring in a 5x5 patch): '
          f'{context["accuracy"]:.2f} % correct; best without context: {context["blind"]:.2f} %')
    print(f'  predictions (image | ground truth | prediction): {picture}')
    print(f'  checkpoint: {checkpoint}')
    print(f'  full logs: {logs["train"]}, {logs["test"]} (mmengine\'s own logs and the configs: '
          f'{_short(train_dir)}/, {_short(test_dir)}/)')
    print('=' * 72, flush=True)
    return result


if __name__ == '__main__':
    main()
