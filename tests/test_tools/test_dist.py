"""Multi-process CPU training (gloo) via tools/dist_train.sh, and testing via dist_test.sh."""
import json
import os.path as osp
import socket
import sys
import textwrap

import pytest
import torch
from tool_helpers import SEG_CONFIG, TOOLS, load_tool, run_script, synthetic, tiny_seg_options

HOOK = '''
import json
import os

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class DumpRankParamsHook(Hook):
    """Saves every rank's parameters before and after training, and the DDP wrapper settings."""

    def _save(self, runner, tag):
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        torch.save(params, os.path.join(runner.work_dir, f'{tag}_rank{get_rank()}.pth'))

    def before_train(self, runner):
        self._save(runner, 'init')
        info = dict(wrapper=type(runner.model).__name__,
                    device_ids=getattr(runner.model, 'device_ids', 'n/a'),
                    backend=torch.distributed.get_backend())
        with open(os.path.join(runner.work_dir, f'wrapper_rank{get_rank()}.json'), 'w') as f:
            json.dump(info, f)

    def after_train(self, runner):
        self._save(runner, 'final')
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _runtime_env(log: str) -> dict:
    """The ``Runtime environment:`` block of a runner's print-out, as a dict of strings."""
    block = log.split('Runtime environment:\n', 1)[1].split('-' * 60, 1)[0]
    return dict(line.strip().split(': ', 1) for line in block.splitlines() if ': ' in line)


def _check_env_printout(log: str, world_size: int) -> None:
    """The print-out names the backend and the device in use, and the ops line is there."""
    env = _runtime_env(log)
    assert env['Distributed training'] == 'True' and env['World size'] == str(world_size)
    backend = 'nccl' if torch.cuda.is_available() else 'gloo'
    assert env['Distributed backend'] == backend and f"'backend': '{backend}'" in env['dist_cfg']
    if torch.cuda.is_available():
        assert env['Device'].startswith('cuda (') and env['GPU number'] == str(world_size)
    else:
        assert env['Device'] == 'cpu (1 torch thread per process)', env
        assert env['GPU number'] == '0'
        assert 'nccl' not in log.split('Config:', 1)[0]
    ops = [line for line in log.splitlines() if 'mmboat ops (' in line]
    assert ops and 'neighborhood attention -> ' in ops[0] and 'reason: ' in ops[0], ops


def test_runtime_env_of_a_gloo_group(tmp_path):
    """A one-process gloo group: the print-out reports gloo and the device, not the config's
    nccl; the tools' config names gloo too on a CPU-only machine."""
    from mmengine.config import Config

    from mmboat.engine.runner_setup import setup_cpu_ddp
    from mmboat.utils.collect_env import collect_runtime_env

    env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl', timeout=60))
    local = collect_runtime_env(env_cfg, 'none', 1)
    assert local['Distributed training'] is False and local['dist_cfg']['backend'] == 'nccl'
    assert local['Distributed backend'] == 'none (one process)'
    dist = torch.distributed
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/store', rank=0,
                            world_size=1)
    try:
        env = collect_runtime_env(env_cfg, 'pytorch', 1)
    finally:
        dist.destroy_process_group()
    assert env['dist_cfg'] == dict(backend='gloo', timeout=60) and env['cudnn_benchmark'] is False
    assert env['Distributed backend'] == 'gloo' and env['World size'] == 1
    assert env_cfg['dist_cfg']['backend'] == 'nccl'  # the caller's dict is left alone
    if not torch.cuda.is_available():
        threads = torch.get_num_threads()
        assert env['Device'].startswith(f'cpu ({threads} torch thread') and env['GPU number'] == 0

    for given in (None, dict(cudnn_benchmark=False), dict(dist_cfg=dict(backend='nccl')),
                  dict(dist_cfg=dict(backend='mpi'))):
        cfg = Config(dict(launcher='pytorch') if given is None else
                     dict(launcher='pytorch', env_cfg=given))
        setup_cpu_ddp(cfg)
        if torch.cuda.is_available():
            assert cfg.get('env_cfg') == given
        else:
            backend = 'mpi' if given and given.get('dist_cfg', {}).get('backend') == 'mpi' \
                else 'gloo'
            assert cfg.env_cfg.dist_cfg.backend == backend, cfg.env_cfg


@pytest.mark.slow
def test_dist_train_two_cpu_processes(tmp_path):
    data_root = str(tmp_path / 'data')
    synthetic().make_seg_dataset(data_root, num_train=8, num_val=4, size=64, seed=3)
    (tmp_path / 'rank_dump_hook.py').write_text(HOOK)
    config = tmp_path / 'dist_cfg.py'
    config.write_text(textwrap.dedent(f'''
        _base_ = [{SEG_CONFIG!r}]
        custom_imports = dict(imports=['mmboat.models', 'rank_dump_hook'],
                              allow_failed_imports=False)
        custom_hooks = [dict(type='DumpRankParamsHook')]
    '''))
    work_dir = str(tmp_path / 'work')
    # the scripts run $PYTHON (default: `python` on PATH); use this interpreter's environment
    env = {'PORT': str(_free_port()), 'PYTHONPATH': str(tmp_path), 'MMBOAT_NUM_THREADS': '1',
           'PYTHON': sys.executable}
    proc = run_script(['bash', osp.join(TOOLS, 'dist_train.sh'), str(config), '2', '--work-dir',
                       work_dir, '--cfg-options'] + tiny_seg_options(data_root, iters=3), env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    _check_env_printout(proc.stdout, world_size=2)

    for rank in (0, 1):
        with open(osp.join(work_dir, f'wrapper_rank{rank}.json')) as f:
            info = json.load(f)
        assert info['wrapper'] == 'MMDistributedDataParallel'
        if not torch.cuda.is_available():
            assert info['device_ids'] is None and info['backend'] == 'gloo'
    init = [torch.load(osp.join(work_dir, f'init_rank{r}.pth')) for r in (0, 1)]
    final = [torch.load(osp.join(work_dir, f'final_rank{r}.pth')) for r in (0, 1)]
    assert final[0].keys() == final[1].keys() and len(final[0]) > 0
    for name in final[0]:
        # DDP broadcasts rank 0's initial weights and averages the gradients: the ranks saw
        # different images, yet every parameter must be bit-identical after the steps.
        assert torch.equal(init[0][name], init[1][name]), name
        assert torch.equal(final[0][name], final[1][name]), name
    changed = [n for n in final[0] if not torch.equal(init[0][n], final[0][n])]
    assert len(changed) > len(final[0]) // 2, 'training did not update the parameters'
    ckpt = osp.join(work_dir, 'iter_3.pth')
    assert osp.isfile(ckpt)

    env['PORT'] = str(_free_port())
    proc = run_script(['bash', osp.join(TOOLS, 'dist_test.sh'), SEG_CONFIG, ckpt, '2',
                       '--work-dir', str(tmp_path / 'test'), '--cfg-options'] +
                      tiny_seg_options(data_root), env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert 'mIoU' in proc.stdout


@pytest.mark.slow
def test_tools_destroy_the_process_group(tmp_path, monkeypatch):
    """train.py / test.py end a successful distributed run with release_distributed().

    Without it a gloo worker thread could still be freeing the last collective's tensors when
    the interpreter shut down, and abort the process after a good run (``terminate called
    without an active exception``; about 1 in 10 dist_test.sh runs here). The 2-process test
    above exercises the race; this one checks the tools' wiring in-process (world size 1).
    """
    import torch.distributed as dist

    assert not dist.is_initialized()
    data_root = str(tmp_path / 'data')
    synthetic().make_seg_dataset(data_root, num_train=2, num_val=2, size=64, seed=5)
    for key, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)
    work_dir = str(tmp_path / 'work')
    try:
        load_tool('train.py').main([SEG_CONFIG, '--launcher', 'pytorch', '--work-dir', work_dir,
                                    '--cfg-options'] + tiny_seg_options(data_root, iters=2))
        assert not dist.is_initialized(), 'train.py left the process group alive'
        monkeypatch.setenv('MASTER_PORT', str(_free_port()))
        metrics = load_tool('test.py').main(
            [SEG_CONFIG, osp.join(work_dir, 'iter_2.pth'), '--launcher', 'pytorch',
             '--work-dir', str(tmp_path / 'test'), '--cfg-options'] + tiny_seg_options(data_root))
        assert 'mIoU' in metrics
        assert not dist.is_initialized(), 'test.py left the process group alive'
    finally:
        if dist.is_initialized():  # keep a failure from leaking the group into later tests
            dist.destroy_process_group()


def test_dist_scripts_usage():
    for script, nargs in (('dist_train.sh', 2), ('dist_test.sh', 3)):
        proc = run_script(['bash', osp.join(TOOLS, script)])
        assert proc.returncode == 2
        assert 'usage' in proc.stdout and 'NUM_PROCS' in proc.stdout
