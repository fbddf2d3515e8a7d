"""Throughput, latency and peak memory of a config's model, or of backbones side by side.

Config mode, with the arguments of mmdet's and mmseg's ``tools/analysis_tools/benchmark.py``::

    python tools/analysis_tools/benchmark.py CONFIG [CHECKPOINT | --checkpoint CHECKPOINT]
        [--shape H [W]] [--batch-size 1] [--max-iter 20] [--num-warmup 3] [--repeat-num 1]
        [--log-interval 50] [--work-dir DIR] [--cfg-options k=v ...]
        [--launcher none|pytorch|slurm|mpi] [--device auto|cpu|cuda] [--impl auto ext reference]
        [--allow-partial-checkpoint]

builds the model of an mmpretrain, mmdet or mmseg config (its ``default_scope`` and
``custom_imports`` decide the registry), loads CHECKPOINT when one is given and times
``model.test_step`` (data preprocessing, inference and post-processing) on random images of the
config's test size: what its test pipeline makes of a square image (``--shape`` overrides it). A
checkpoint that would leave most of the model unloaded (another model's weights, another
architecture's, a classification release given to a detector) stops with an error saying what it
looks like; official classification releases load into classification configs converted in
memory, as in ``tools/test.py``. Without a checkpoint the model has random weights: that does not
change the speed of classifiers and segmentors, but it does change a detector's (how many boxes
survive NMS decides the work of its RoI heads), which the output says.

Backbone mode::

    python tools/analysis_tools/benchmark.py --models boat-swin-t swin-t nat-tiny [--interleave]
        [--mode infer|train] [--shape 224] [--batch-size 1] [--impl auto ext reference] [--quick]

builds the named backbones (random weights) and times them on ``[batch, 3, H, W]`` random input;
``--mode train`` times forward + backward.

``--impl`` picks the implementation of mmboat's ops (``MMBOAT_OPS_IMPL``): ``ext`` the compiled
kernels, ``reference`` the pure-PyTorch fallback; every value gives its own row.

Every row runs in a fresh Python process (build, warm-up, timed iterations), so rows share no
allocator state, caches or one-time initialisation. Its peak memory is measured there: on CUDA
``torch.cuda.max_memory_allocated`` (the weights, inputs and activations the model holds, without
the CUDA context and the caching allocator's reserve); on CPU the growth of the process's
resident-set high-water mark (``VmHWM``, reset first; ``ru_maxrss`` where ``/proc`` is missing)
over its resident set just before the model is built, after ``malloc_trim`` has handed the memory
freed during the imports back to the system: everything running the model took - weights,
inputs, activations, kernel workspaces and the allocator's overhead. In a process that has run
other models, freed memory is reused without growing the resident set, which is how rows used to
show "0 MB"; a row whose memory could not be measured shows ``n/a``, never 0.

``--interleave`` builds every row's model in this process and times them in rounds (each round
runs every model once, in turn), so latency ratios are taken side by side even when the machine's
load drifts; each row's peak memory still comes from a fresh process running its warm-up.
``--repeat-num N`` (mmseg: ``--repeat-times``) measures everything N times (fresh processes each
time) and prints the mean and spread of images/s. With ``--launcher`` every rank benchmarks its
own copy of the model (on its own GPU) and rank 0 prints the rows of all ranks. ``--work-dir``
saves the rows as JSON.
"""
import argparse
import importlib
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# The repository root (mmboat without installing it) and this folder (the tools' timing helper),
# also when the script is imported by path.
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.dirname(osp.abspath(__file__)))

from mmboat.engine.runner_setup import (  # noqa: E402  (imports nothing heavy)
    add_launcher_args,
    export_local_rank,
    prepare_environment,
    register_downstream,
    release_distributed,
)

#: name -> (registry type, constructor arguments); ``mmboat.`` types use mmboat's ops.
MODEL_ZOO: Dict[str, dict] = {
    'nat-mini': dict(type='mmboat.NAT', arch='mini', out_indices=(0, 1, 2, 3)),
    'nat-tiny': dict(type='mmboat.NAT', arch='tiny', out_indices=(0, 1, 2, 3)),
    'dinat-tiny': dict(type='mmboat.DiNAT', arch='tiny', out_indices=(0, 1, 2, 3)),
    'boat-swin-t': dict(type='mmboat.BOATSwinTransformer', arch='tiny',
                        out_indices=(0, 1, 2, 3)),
    'boat-cswin-t': dict(type='mmboat.BOATCSWinTransformer', arch='tiny',
                         out_indices=(0, 1, 2, 3)),
    'swin-t': dict(type='mmpretrain.SwinTransformer', arch='tiny', out_indices=(0, 1, 2, 3),
                   pad_small_map=True),
    'convnext-t': dict(type='mmpretrain.ConvNeXt', arch='tiny', out_indices=(0, 1, 2, 3)),
}
DEFAULT_MODELS = ['nat-tiny', 'swin-t', 'convnext-t']
WORKER_FLAG = '--worker'  # internal: ``--worker SPEC.json RESULT.json`` runs one row


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Benchmark the model of a config, or backbones side by side (mmboat)')
    parser.add_argument('config', nargs='?',
                        help='mmpretrain/mmdet/mmseg config file (or --models for backbones)')
    parser.add_argument('checkpoint', nargs='?',
                        help='checkpoint for CONFIG (optional: random weights without it)')
    parser.add_argument('--checkpoint', dest='checkpoint_opt', metavar='CHECKPOINT',
                        help='the same as the positional CHECKPOINT (mmdet\'s spelling)')
    parser.add_argument('--models', nargs='+', default=None,
                        help=f'backbones from {sorted(MODEL_ZOO)}; default {DEFAULT_MODELS}')
    parser.add_argument('--shape', type=int, nargs='+', default=None,
                        help='input H [W]; default: the config\'s test size, 224 for --models, '
                        '64 with --quick')
    parser.add_argument('--batch-size', type=int, default=1, help='images per step')
    parser.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda'])
    parser.add_argument('--impl', nargs='+', default=['auto'],
                        choices=['auto', 'ext', 'reference'],
                        help='mmboat op implementation(s) (MMBOAT_OPS_IMPL), one row each')
    parser.add_argument('--mode', default='infer', choices=['infer', 'train'],
                        help='--models only: infer (no-grad forward) or train (forward + '
                        'backward)')
    parser.add_argument('--iters', '--max-iter', dest='iters', type=int, default=None,
                        help='timed iterations per row (default 20, 2 with --quick)')
    parser.add_argument('--warmup', '--num-warmup', dest='warmup', type=int, default=None,
                        help='untimed iterations first (default 3, 1 with --quick)')
    parser.add_argument('--repeat-num', '--repeat-times', dest='repeat_num', type=int, default=1,
                        help='measure everything this many times; prints mean and spread')
    parser.add_argument('--log-interval', type=int, default=50,
                        help='print the running images/s every N timed iterations (0: never)')
    parser.add_argument('--work-dir', help='save the rows and the arguments as JSON here')
    parser.add_argument('--interleave', action='store_true',
                        help='time the rows in rounds, one step of each per round')
    parser.add_argument('--quick', action='store_true',
                        help='tiny run (64x64, 2 iterations, 1 warm-up): checks that it works')
    args = export_local_rank(add_launcher_args(parser).parse_args(argv))

    if args.checkpoint_opt is not None:
        if args.checkpoint is not None and args.checkpoint != args.checkpoint_opt:
            parser.error('give the checkpoint once: positional CHECKPOINT or --checkpoint')
        args.checkpoint = args.checkpoint_opt
    if args.config is not None:
        if args.models is not None:
            parser.error('give a CONFIG or --models, not both')
        if not osp.isfile(args.config):
            parser.error(f'config file not found: {args.config} (backbone names go after '
                         '--models)')
        if args.mode == 'train':
            parser.error('--mode train needs --models: a config\'s training step needs '
                         'annotated data; CONFIG mode times inference (model.test_step)')
        if args.checkpoint and '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
            parser.error(f'checkpoint not found: {args.checkpoint}')
    else:
        if args.checkpoint is not None:
            parser.error('a checkpoint needs a CONFIG (--models builds backbones with random '
                         'weights)')
        if args.cfg_options:
            parser.error('--cfg-options needs a CONFIG')
        args.models = args.models or DEFAULT_MODELS
        unknown = [m for m in args.models if m not in MODEL_ZOO]
        if unknown:
            parser.error(f'unknown model(s) {unknown}; choose from {sorted(MODEL_ZOO)}')
    args.shape_source = '--shape' if args.shape is not None else '--quick' if args.quick else None
    if args.shape is None and (args.quick or args.config is None):
        args.shape = [64] if args.quick else [224]
    if args.shape is not None:
        if len(args.shape) == 1:
            args.shape = args.shape * 2
        if len(args.shape) != 2 or min(args.shape) < 1:
            parser.error(f'--shape takes H or H W (positive), got {args.shape}')
    if args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')
    args.iters = args.iters if args.iters is not None else (2 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if args.iters < 1 or args.warmup < 0 or args.repeat_num < 1 or args.log_interval < 0:
        parser.error('--iters and --repeat-num must be >= 1, --warmup and --log-interval >= 0')
    return args


# ------------------------------------------------------------------------------------------
# Peak memory
# ------------------------------------------------------------------------------------------
def _proc_status(field: str) -> Optional[int]:
    """A ``/proc/self/status`` size field in bytes, None where there is none."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _max_rss() -> int:
    """``ru_maxrss`` in bytes (KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024


class PeakMemory:
    """Peak memory this process takes between :meth:`start` and :meth:`stop`, in bytes.

    CUDA: ``max_memory_allocated`` above ``memory_allocated`` at the start. CPU: the resident
    set's high-water mark above the resident set at the start. The start hands free heap memory
    back to the system (``malloc_trim``) and resets the high-water mark (``/proc/self/clear_refs``),
    so memory freed earlier does not hide the growth; without ``/proc`` it falls back to
    ``ru_maxrss``, the peak since the process began.

    Args:
        device (str): ``'cpu'`` or a CUDA device.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.base = 0
        self.hwm = False

    def start(self) -> 'PeakMemory':
        if self.device.startswith('cuda'):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            import ctypes
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
        except OSError:
            pass
        rss = _proc_status('VmRSS')
        self.hwm = rss is not None and _proc_status('VmHWM') is not None
        self.base = rss if self.hwm else _max_rss()
        return self

    def stop(self) -> int:
        if self.device.startswith('cuda'):
            import torch

            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.base
        top = _proc_status('VmHWM') if self.hwm else _max_rss()
        return top - self.base


# ------------------------------------------------------------------------------------------
# Building a row: a backbone of MODEL_ZOO or the model of a config
# ------------------------------------------------------------------------------------------
def build_model(name: str):
    from mmengine.registry import MODELS

    import mmboat.models  # noqa: F401
    spec = dict(MODEL_ZOO[name])
    if spec['type'].startswith('mmpretrain.'):
        import mmpretrain.models  # noqa: F401
    return MODELS.build(spec)


def make_step(model, inputs, mode: str) -> Callable[[], None]:
    """One inference (no grad) or training (forward + backward) step of a backbone."""
    import torch

    def step() -> None:
        if mode == 'infer':
            with torch.no_grad():
                model(inputs)
        else:
            outs = model(inputs)
            sum(o.float().mean() for o in outs).backward()
            model.zero_grad(set_to_none=True)

    return step


def config_test_shape(cfg) -> Tuple[Tuple[int, int], str]:
    """``(H, W)`` of what the config's test pipeline makes of a square image, and its source.

    The last ``Resize``/``ResizeEdge``/``CenterCrop`` of the test pipeline decides: a kept-ratio
    resize fits the square into its scale (the short side of the scale), a plain one gives its
    scale (``(w, h)``), a crop its size. Without one, the data preprocessor's ``size`` or the test
    ``crop_size`` of a segmentor.

    Raises:
        ValueError: none of them is in the config (then ``--shape`` is needed).
    """
    dataset = (cfg.get('test_dataloader', None) or {}).get('dataset', None) or {}
    pipeline = dataset.get('pipeline', None) or cfg.get('test_pipeline', None) or []
    shape, source = None, None
    for transform in pipeline:
        kind = str(transform.get('type', '')).split('.')[-1]
        if kind == 'CenterCrop' and transform.get('crop_size') is not None:
            size = transform['crop_size']
            shape = (size, size) if isinstance(size, int) else (size[1], size[0])
        elif kind in ('Resize', 'ResizeEdge') and transform.get('scale') is not None:
            scale = transform['scale']
            if isinstance(scale, int):
                shape = (scale, scale)
            elif transform.get('keep_ratio', False):
                shape = (min(scale), min(scale))
            else:
                shape = (scale[1], scale[0])
        else:
            continue
        settings = ', '.join(f'{k}={v}' for k, v in transform.items()
                             if k in ('scale', 'crop_size', 'keep_ratio'))
        source = f'the test pipeline\'s {kind}({settings}) on a square image'
    if shape is None:
        model = cfg.get('model', None) or {}
        size = ((model.get('data_preprocessor', None) or {}).get('size', None)
                or (model.get('test_cfg', None) or {}).get('crop_size', None))
        if size is not None:
            shape, source = tuple(size), 'the model\'s data_preprocessor size / test crop_size'
    if shape is None:
        raise ValueError(f'{cfg.filename}: no test input size found (no Resize, ResizeEdge or '
                         'CenterCrop in the test pipeline, no data_preprocessor size); pass '
                         '--shape H W')
    return (int(shape[0]), int(shape[1])), source


def config_batch(scope: str, shape, batch: int) -> dict:
    """``batch`` random uint8 images of ``shape`` with their data samples, as a data loader
    of the config's library yields them (the input of ``model.test_step``)."""
    import torch

    if scope == 'mmseg':
        from mmseg.structures import SegDataSample as Sample
    elif scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmpretrain.structures import DataSample as Sample
    h, w = shape
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1.0, 1.0))
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
              for _ in range(batch)]
    return dict(inputs=images, data_samples=[Sample(metainfo=meta) for _ in range(batch)])


def load_config_checkpoint(model, checkpoint: str, allow_partial: bool = False) -> str:
    """Load ``checkpoint`` into a config's model after mmboat's check that it fits.

    Returns:
        str: a line saying what was loaded.

    Raises:
        RuntimeError: the checkpoint would load less than half of the model (the message says
            what it looks like), unless ``allow_partial``.
    """
    from mmengine.runner import load_checkpoint

    from mmboat.models.utils.pretrained import ALLOW_PARTIAL_ENV, check_model_checkpoint

    coverage = check_model_checkpoint(model, checkpoint, allow_partial)
    if allow_partial:  # also for the backbones' own check while mmengine loads
        os.environ[ALLOW_PARTIAL_ENV] = '1'
    loaded = load_checkpoint(model, checkpoint, map_location='cpu', logger='current')
    meta = loaded.get('meta', None) if isinstance(loaded, dict) else None
    release = meta.get('official_release') if isinstance(meta, dict) else None
    how = f'; {release}, converted in memory' if release else ''
    return f'weights: {checkpoint} ({100 * coverage:.0f}% of the model{how})'


def build_config_model(spec: dict):
    """The model of ``spec['config']`` on its device (eval mode), its test batch and facts."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    cfg = Config.fromfile(spec['config'])
    if spec.get('cfg_options'):
        cfg.merge_from_dict(spec['cfg_options'])
    scope = register_downstream(cfg)
    import mmboat.models  # noqa: F401  (mmboat's backbones)
    init_default_scope(scope)
    model = MODELS.build(cfg.model)
    if spec.get('checkpoint'):
        notes = [load_config_checkpoint(model, spec['checkpoint'], spec.get('allow_partial'))]
    else:
        notes = ['weights: RANDOM (no checkpoint given); ' + (
            'a detector\'s speed depends on its weights (its heads process the boxes that '
            'survive NMS): time it with its checkpoint' if scope == 'mmdet' else
            'the timings do not depend on the weights')]
    model.to(spec['device']).eval()
    if spec.get('shape'):
        shape, source = tuple(spec['shape']), spec.get('shape_source') or '--shape'
    else:
        shape, source = config_test_shape(cfg)
    notes.append(f'input {shape[0]}x{shape[1]}: {source}')
    return model, config_batch(scope, shape, spec['batch']), dict(shape=shape, notes=notes)


def build_entry(spec: dict):
    """A row's model (on its device), its step and facts (``params``, ``shape``, ``notes``).

    The step selects the row's op implementation (``MMBOAT_OPS_IMPL``) before it runs.
    """
    import torch

    impl = spec['impl']

    def use_impl() -> None:
        if impl != '-':
            os.environ['MMBOAT_OPS_IMPL'] = impl

    use_impl()
    torch.manual_seed(0)
    if spec.get('config'):
        model, data, info = build_config_model(spec)

        def step() -> None:
            with torch.no_grad():
                model.test_step(data)
    else:
        model = build_model(spec['model']).to(spec['device'])
        model.train(spec['mode'] == 'train')
        h, w = spec['shape']
        inputs = torch.randn(spec['batch'], 3, h, w, device=spec['device'])
        step = make_step(model, inputs, spec['mode'])
        info = dict(shape=(h, w), notes=[])
    info['params'] = sum(p.numel() for p in model.parameters())
    return model, (lambda: (use_impl(), step())), info


def import_libraries(spec: dict) -> None:
    """Import (and register) everything building and running the row will need."""
    import mmengine.runner  # noqa: F401  (checkpoint loading)

    import mmboat.models  # noqa: F401
    if spec.get('config'):
        from mmengine.config import Config

        scope = register_downstream(Config.fromfile(spec['config']))
        importlib.import_module(f'{scope}.structures')
    elif MODEL_ZOO[spec['model']]['type'].startswith('mmpretrain.'):
        import mmpretrain.models  # noqa: F401


def _sync(device: str) -> Callable[[], None]:
    if not device.startswith('cuda'):
        return lambda: None
    import torch
    return lambda: torch.cuda.synchronize(device)


def run_row(spec: dict) -> dict:
    """Build, warm up and time one row in this process, measuring its peak memory.

    Returns:
        dict: ``times`` (seconds per step), ``peak_bytes``, ``params``, ``shape``, ``notes``.
    """
    from _timing import time_rounds

    sync = _sync(spec['device'])
    import_libraries(spec)  # before the memory baseline: imports are not the model's memory
    memory = PeakMemory(spec['device']).start()
    _, step, info = build_entry(spec)
    time_rounds({0: step}, 0, spec['warmup'], sync)
    times: List[float] = []
    iters, interval = spec['iters'], spec['log_interval']
    while len(times) < iters:
        chunk = min(interval or iters, iters - len(times))
        times += time_rounds({0: step}, chunk, 0, sync)[0]
        if interval and len(times) % interval == 0:
            print(f'{spec["label"]} [{spec["impl"]}]: done {len(times)}/{iters}, '
                  f'{spec["batch"] * len(times) / sum(times):.2f} images/s', flush=True)
    return dict(times=times, peak_bytes=memory.stop(), params=info['params'],
                shape=list(info['shape']), notes=info['notes'])


def worker_main(spec_file: str, result_file: str) -> int:
    """Entry point of the fresh process that runs one row (``--worker SPEC RESULT``)."""
    with open(spec_file) as f:
        spec = json.load(f)
    from mmboat.utils import apply_stack_fixes, limit_cpu_threads

    apply_stack_fixes()
    limit_cpu_threads(spec['threads'])
    try:
        result = run_row(spec)
    except Exception as exc:  # the parent raises it, naming the row
        traceback.print_exc()
        result = dict(error=f'{type(exc).__name__}: {exc}')
    with open(result_file, 'w') as f:
        json.dump(result, f)
    return 1 if 'error' in result else 0


def run_in_fresh_process(spec: dict) -> dict:
    """:func:`run_row` in a new Python process; its output goes to this one's."""
    with tempfile.TemporaryDirectory(prefix='mmboat_benchmark_') as tmp:
        spec_file, result_file = osp.join(tmp, 'spec.json'), osp.join(tmp, 'result.json')
        with open(spec_file, 'w') as f:
            json.dump(spec, f)
        env = dict(os.environ, MMBOAT_NUM_THREADS=str(spec['threads']))
        env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
        sys.stdout.flush()
        proc = subprocess.run(
            [sys.executable, osp.abspath(__file__), WORKER_FLAG, spec_file, result_file],
            env=env)
        result = None
        if osp.isfile(result_file):
            with open(result_file) as f:
                result = json.load(f)
    if result is None:
        raise RuntimeError(f'{spec["label"]} [{spec["impl"]}]: the benchmark process ended with '
                           f'status {proc.returncode} and no result (killed, e.g. out of memory?)')
    if 'error' in result:
        raise RuntimeError(f'{spec["label"]} [{spec["impl"]}]: {result["error"]}')
    return result


# ------------------------------------------------------------------------------------------
# Rows and the table
# ------------------------------------------------------------------------------------------
def row_specs(args: argparse.Namespace, device: str, threads: int) -> List[dict]:
    """One JSON-able description per row (model or config, implementation, sizes)."""
    common = dict(device=device, shape=args.shape, batch=args.batch_size, mode=args.mode,
                  warmup=args.warmup, iters=args.iters, log_interval=args.log_interval,
                  threads=threads)
    if args.config is not None:
        label = osp.splitext(osp.basename(args.config))[0]
        return [dict(common, label=label, impl=impl, config=osp.abspath(args.config),
                     shape_source=args.shape_source, cfg_options=args.cfg_options,
                     checkpoint=args.checkpoint,
                     allow_partial=args.allow_partial_checkpoint) for impl in args.impl]
    return [dict(common, label=name, impl=impl, model=name) for name in args.models
            for impl in (args.impl if MODEL_ZOO[name]['type'].startswith('mmboat.') else ['-'])]


def make_row(spec: dict, result: dict, times: List[float], run: int) -> Dict[str, object]:
    latency = statistics.median(times)
    h, w = result['shape']
    peak = result['peak_bytes']
    return dict(model=spec['label'], impl=spec['impl'], params_m=result['params'] / 1e6,
                device=spec['device'], batch=spec['batch'], shape=f'{h}x{w}', mode=spec['mode'],
                latency_ms=latency * 1e3, images_s=spec['batch'] / latency,
                peak_mem_mb=peak / 2**20 if peak and peak > 0 else None, run=run,
                notes=result['notes'])


def run(args: argparse.Namespace, device: str, threads: int) -> List[Dict[str, object]]:
    specs = row_specs(args, device, threads)
    rows = []
    if not args.interleave:  # every row and repeat in its own process
        for run_index in range(1, args.repeat_num + 1):
            for spec in specs:
                result = run_in_fresh_process(spec)
                rows.append(make_row(spec, result, result['times'], run_index))
        return rows
    from _timing import time_rounds

    # Memory first, each row in a fresh process running its warm-up (at least one step).
    measured = [run_in_fresh_process(dict(spec, iters=0, warmup=max(spec['warmup'], 1)))
                for spec in specs]
    steps = {i: build_entry(spec)[1] for i, spec in enumerate(specs)}
    for run_index in range(1, args.repeat_num + 1):
        times = time_rounds(steps, args.iters, args.warmup, _sync(device))
        rows += [make_row(spec, result, times[i], run_index)
                 for i, (spec, result) in enumerate(zip(specs, measured))]
    return rows


def _mb(value: Optional[float]) -> str:
    if value is None:
        return 'n/a'
    return f'{value:.0f}' if value >= 100 else f'{value:.1f}' if value >= 1 else f'{value:.2g}'


def format_table(rows: List[Dict[str, object]]) -> str:
    columns = [('model', 'model', '{}'), ('impl', 'impl', '{}'),
               ('params (M)', 'params_m', '{:.1f}'), ('device', 'device', '{}'),
               ('batch', 'batch', '{}'), ('input', 'shape', '{}'), ('mode', 'mode', '{}'),
               ('latency (ms)', 'latency_ms', '{:.1f}'), ('images/s', 'images_s', '{:.2f}'),
               ('peak mem (MB)', 'peak_mem_mb', None)]
    if len({r['run'] for r in rows}) > 1:
        columns.insert(0, ('run', 'run', '{}'))
    if len({r.get('rank', 0) for r in rows}) > 1:
        columns.insert(0, ('rank', 'rank', '{}'))
    headers = [c[0] for c in columns]
    cells = [[_mb(r[key]) if fmt is None else fmt.format(r[key]) for _, key, fmt in columns]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    first_number = headers.index('params (M)')
    line = '| ' + ' | '.join(h.ljust(wd) for h, wd in zip(headers, widths)) + ' |'
    sep = '|' + '|'.join('-' * (wd + 2) for wd in widths) + '|'
    body = ['| ' + ' | '.join(c.rjust(wd) if i >= first_number else c.ljust(wd)
                              for i, (c, wd) in enumerate(zip(cell, widths))) + ' |'
            for cell in cells]
    return '\n'.join([line, sep] + body)


def repeat_summary(rows: List[Dict[str, object]]) -> List[str]:
    """Mean, standard deviation and range of images/s per row over the repeats."""
    groups: Dict[tuple, List[float]] = OrderedDict()
    for r in rows:
        groups.setdefault((r.get('rank', 0), r['model'], r['impl']), []).append(r['images_s'])
    lines = []
    for (rank, model, impl), values in groups.items():
        if len(values) > 1:
            where = f'rank {rank}: ' if any(r.get('rank', 0) for r in rows) else ''
            lines.append(f'{where}{model} [{impl}]: {statistics.mean(values):.2f} +- '
                         f'{statistics.stdev(values):.2f} images/s over {len(values)} runs '
                         f'(min {min(values):.2f}, max {max(values):.2f})')
    return lines


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        sys.exit(worker_main(*argv[1:3]))
    args = parse_args(argv)
    prepare_environment(args.launcher)
    import torch

    from mmboat.ops import ext_info

    rank, world_size = 0, 1
    if args.launcher != 'none':
        from mmengine.dist import get_dist_info, init_dist
        init_dist(args.launcher)  # gloo on CPU (mmboat's stack fixes), nccl on GPUs
        rank, world_size = get_dist_info()
    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError('--device cuda was requested but no CUDA device is available')
        device = f'cuda:{torch.cuda.current_device()}'
    threads = torch.get_num_threads()
    info = ext_info()
    if rank == 0:
        print(f'mmboat._ext: {"loaded" if info["loaded"] else "missing"}'
              f'{" (CUDA)" if info["with_cuda"] else ""}; CPU threads: {threads}'
              f'{f" per rank, {world_size} ranks" if world_size > 1 else ""}; every row runs '
              'in a fresh process', flush=True)
    saved_impl = os.environ.get('MMBOAT_OPS_IMPL')
    try:
        rows = run(args, device, threads)
    finally:  # --interleave selects implementations through MMBOAT_OPS_IMPL; in-process
        if saved_impl is None:  # callers (tests, notebooks) get their setting back
            os.environ.pop('MMBOAT_OPS_IMPL', None)
        else:
            os.environ['MMBOAT_OPS_IMPL'] = saved_impl
    if world_size > 1:
        from mmengine.dist import all_gather_object
        for row in rows:
            row['rank'] = rank
        rows = [row for ranked in all_gather_object(rows) for row in ranked]
    if rank == 0:
        for note in OrderedDict.fromkeys(n for r in rows for n in r['notes']):
            print(note)
        print(format_table(rows), flush=True)
        for line in repeat_summary(rows):
            print(line)
        if args.work_dir:
            os.makedirs(args.work_dir, exist_ok=True)
            path = osp.join(args.work_dir, f'benchmark_{time.strftime("%Y%m%d_%H%M%S")}.json')
            with open(path, 'w') as f:
                json.dump(dict(args=vars(args), rows=rows), f, indent=1, default=str)
            print(f'rows saved to {path}')
    release_distributed()
    return rows


if __name__ == '__main__':
    main()
