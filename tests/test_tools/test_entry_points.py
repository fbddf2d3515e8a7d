"""OpenMMLab's own entry points with mmboat, each in a fresh interpreter as a user types it, with
no extra call: the downstream imports, ``get_model``, the downstream packages' own
``tools/train.py`` / ``tools/test.py`` and their inferencers on checkpoints saved by mmboat's
``tools/train.py`` (the start-up hook installed by ``tools/setup_env.sh`` and the allow-list
applied by ``import mmboat.models``, see mmboat/_startup.py and mmboat/utils/compat.py)."""
import importlib.util
import os
import os.path as osp
import subprocess
import sys

import pytest
from tool_helpers import (DET_CONFIG, ROOT, SEG_CONFIG, TOOLS, synthetic, tiny_det_options,
                          tiny_seg_options)

from mmboat._startup import PTH_NAME


def _fresh(code: str, cwd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter (see :func:`_script`)."""
    return _script(['-c', code], cwd, timeout)


def _script(argv, cwd: str, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """``python *argv`` in a fresh interpreter of this environment, outside the repository,
    with no PYTHONPATH: only what the environment itself holds (plus ``env``)."""
    env = {**{k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}, **(env or {})}
    env.setdefault('MMBOAT_NUM_THREADS', '1')
    return subprocess.run([sys.executable] + argv, cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)


def _downstream_tool(package: str, tool: str) -> str:
    root = importlib.util.find_spec(package).submodule_search_locations[0]
    return osp.join(root, '.mim', 'tools', tool)


def test_startup_hook_is_installed():
    import site

    found = [d for d in site.getsitepackages() if osp.isfile(osp.join(d, PTH_NAME))]
    assert found, (f'{PTH_NAME} is missing from site-packages: run tools/setup_env.sh or '
                   '`python -m mmboat._startup`')


def test_downstream_imports_in_a_fresh_interpreter(tmp_path):
    run = _fresh('import mmdet.models, mmseg.apis, mmpretrain.apis, torchvision; '
                 'import sys; print("torch" in sys.modules)', cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    # Before torchvision, the hook imports nothing heavy at interpreter start.
    run = _fresh('import sys; print("torch" in sys.modules)', cwd=str(tmp_path))
    assert run.stdout.strip() == 'False', run.stdout


def test_get_model_from_a_packaged_config(tmp_path):
    config = osp.join(ROOT, 'configs', 'nat', 'nat-mini_8xb128_in1k.py')
    run = _fresh('from mmpretrain.apis import get_model\n'
                 f'model = get_model({config!r})\n'
                 'print(type(model.backbone).__name__, model.backbone.embed_dims)',
                 cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    assert run.stdout.strip().splitlines()[-1] == 'NAT 64'


@pytest.fixture(scope='module')
def seg_checkpoint(tmp_path_factory):
    """A tiny UperNet-NAT trained 2 iterations by mmboat's tools/train.py (its checkpoint holds
    mmengine's message hub, which weights-only loading must accept)."""
    root = tmp_path_factory.mktemp('entry_seg')
    data = str(root / 'data')
    synthetic().make_seg_dataset(data, num_train=4, num_val=2, size=64, seed=3)
    work_dir = str(root / 'work')
    run = _script([osp.join(TOOLS, 'train.py'), SEG_CONFIG, '--work-dir', work_dir,
                   '--cfg-options'] + tiny_seg_options(data), cwd=str(root))
    assert run.returncode == 0, run.stdout[-3000:]
    config = osp.join(work_dir, osp.basename(SEG_CONFIG))  # the dumped, merged config
    return config, osp.join(work_dir, 'iter_2.pth'), data


@pytest.mark.slow
def test_mmseg_own_tools_and_inferencer(seg_checkpoint, tmp_path):
    config, ckpt, data = seg_checkpoint
    run = _script([_downstream_tool('mmseg', 'test.py'), config, ckpt, '--work-dir',
                   str(tmp_path / 'test')], cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    assert 'mIoU' in run.stdout
    # A checkpoint whose backbone keys lost their prefix: mmseg's own test.py stops instead of
    # testing a random backbone, unless the partial load is asked for.
    import torch
    saved = torch.load(ckpt, map_location='cpu', weights_only=False)
    saved['state_dict'] = {k.replace('backbone.', '', 1): v
                           for k, v in saved['state_dict'].items()}
    torch.save(saved, str(tmp_path / 'unprefixed.pth'))
    argv = [_downstream_tool('mmseg', 'test.py'), config, str(tmp_path / 'unprefixed.pth'),
            '--work-dir', str(tmp_path / 'test_bad')]
    run = _script(argv, cwd=str(tmp_path))
    assert run.returncode != 0 and 'NAT: the weights being loaded would fill only 0%' in \
        run.stdout and "no weights under 'backbone.'" in run.stdout, run.stdout[-3000:]
    run = _script(argv, cwd=str(tmp_path), env={'MMBOAT_ALLOW_PARTIAL_CHECKPOINT': '1'})
    assert run.returncode == 0 and 'mIoU' in run.stdout, run.stdout[-3000:]
    run = _script([_downstream_tool('mmseg', 'train.py'), config, '--work-dir',
                   str(tmp_path / 'train')], cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    assert osp.isfile(tmp_path / 'train' / 'iter_2.pth')
    image = sorted(os.listdir(osp.join(data, 'images', 'validation')))[0]
    image = osp.join(data, 'images', 'validation', image)
    run = _fresh('from mmseg.apis import MMSegInferencer\n'
                 f'inferencer = MMSegInferencer(model={config!r}, weights={ckpt!r}, '
                 'device="cpu")\n'
                 f'result = inferencer({image!r}, return_datasamples=True)\n'
                 'print("RESULT", tuple(result.pred_sem_seg.data.shape))', cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    assert 'RESULT (1, 64, 64)' in run.stdout, run.stdout[-3000:]


@pytest.mark.slow
def test_mmpretrain_own_tools_and_inferencer(tmp_path):
    from test_train_test_cls import CLASSES, CONFIG, _make_folder_dataset

    data = str(tmp_path / 'data')
    _make_folder_dataset(data, num_train=4, num_val=3)
    config = str(tmp_path / 'nat-slim_cls.py')
    with open(config, 'w') as f:
        f.write(CONFIG.format(data_root=data, num_classes=len(CLASSES), classes=CLASSES))
    work_dir = str(tmp_path / 'work')
    run = _script([osp.join(TOOLS, 'train.py'), config, '--work-dir', work_dir],
                  cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    ckpt = osp.join(work_dir, 'iter_2.pth')
    run = _script([_downstream_tool('mmpretrain', 'train.py'), config, '--work-dir',
                   str(tmp_path / 'own')], cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    run = _script([_downstream_tool('mmpretrain', 'test.py'), config, ckpt, '--work-dir',
                   str(tmp_path / 'test')], cwd=str(tmp_path))
    assert run.returncode == 0 and 'accuracy/top1' in run.stdout, run.stdout[-3000:]
    image = osp.join(data, 'val', CLASSES[0], '000.png')
    run = _fresh('from mmpretrain.apis import ImageClassificationInferencer\n'
                 f'inferencer = ImageClassificationInferencer({config!r}, '
                 f'pretrained={ckpt!r}, device="cpu")\n'
                 f'print("RESULT", inferencer({image!r})[0]["pred_class"] in {CLASSES!r})',
                 cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    assert 'RESULT True' in run.stdout, run.stdout[-3000:]


@pytest.mark.slow
def test_mmdet_own_train_tool_and_inferencer(tmp_path):
    data = str(tmp_path / 'synthdet') + '/'
    synthetic().make_det_dataset(data, num_train=4, num_val=2, size=64, seed=2)
    opts = tiny_det_options(data)
    work_dir = str(tmp_path / 'work')
    run = _script([_downstream_tool('mmdet', 'train.py'), DET_CONFIG, '--work-dir', work_dir,
                   '--cfg-options'] + opts, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    config = osp.join(work_dir, osp.basename(DET_CONFIG))
    ckpt = osp.join(work_dir, 'iter_2.pth')
    run = _script([_downstream_tool('mmdet', 'test.py'), config, ckpt, '--work-dir',
                   str(tmp_path / 'test')], cwd=str(tmp_path))
    assert run.returncode == 0 and 'Iter(test) [1/1]' in run.stdout, run.stdout[-3000:]
    image = osp.join(data, 'images', 'val', sorted(os.listdir(osp.join(data, 'images',
                                                                          'val')))[0])
    run = _fresh('from mmdet.apis import DetInferencer\n'
                 f'inferencer = DetInferencer(model={config!r}, weights={ckpt!r}, '
                 'device="cpu")\n'
                 f'result = inferencer({image!r}, return_datasamples=True)\n'
                 'print("RESULT", type(result["predictions"][0]).__name__)', cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    assert 'RESULT DetDataSample' in run.stdout, run.stdout[-3000:]


def test_model_index_in_mmpretrain_hub_from_a_fresh_interpreter(tmp_path):
    """list_models / get_model by name, with nothing imported but mmpretrain."""
    run = _fresh('from mmpretrain import get_model, list_models\n'
                 'names = list_models("*nat*")\n'
                 'print("RESULT", "nat-tiny_8xb128_in1k" in names, '
                 '"dinat-large_in21k-pre_8xb64_in1k" in names, '
                 'len(list_models("boat-*_16xb64_in1k")), sorted(list_models("*swin-tiny_in1k")))\n'
                 'model = get_model("nat-mini_8xb128_in1k")\n'
                 'short = get_model("dinat-mini_in1k")\n'
                 'print("MODEL", type(model.backbone).__name__, type(short.backbone).__name__, '
                 'short.backbone.embed_dims)', cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:]
    assert ("RESULT True True 6 ['boat-cswin-tiny_in1k', 'boat-swin-tiny_in1k']" in run.stdout
            and 'MODEL NAT DiNAT 64' in run.stdout), run.stdout[-3000:]


def test_metafiles_name_official_weights():
    from modelindex.load_model_index import load

    from mmboat.utils.model_index import model_index_path

    index = load(model_index_path())
    index.build_models_with_collections()
    models = {m.name: m for m in index.models}
    assert models['nat-tiny_8xb128_in1k'].weights == (
        'https://shi-labs.com/projects/nat/checkpoints/CLS/nat_tiny.pth')
    for model in models.values():
        assert osp.isfile(osp.join(osp.dirname(model_index_path()), model.config)), model.name
        if model.name.endswith('_in1k'):
            assert model.weights and model.weights.startswith('https://'), model.name
