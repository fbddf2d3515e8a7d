"""FLOPs and parameters of the model in an mmpretrain, mmdet or mmseg config.

    python tools/analysis_tools/get_flops.py CONFIG [--shape H [W]] [--cfg-options k=v ...]
        [--show-table] [--show-arch]

Unlike the stock tools, mmboat's custom ops (neighborhood attention, the FSLA clustering and
clustered attention) and the window / stripe attention (``scaled_dot_product_attention``) are
counted: the model is traced with mmengine's ``FlopAnalyzer`` with the handles of
:mod:`mmboat.ops.flops` added (its docstring states what each op counts). As in mmengine (and
fvcore), one "FLOP" is one multiply-add (MAC); the exact count and the count per operator are
printed too.
"""
import argparse
import importlib
import os.path as osp
import sys
from typing import Dict, List, Optional

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

_SCOPES = ('mmdet', 'mmseg', 'mmpretrain')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description='Get a model\'s FLOPs and parameters (mmboat)')
    parser.add_argument('config', help='config file path')
    parser.add_argument('--shape', type=int, nargs='+', default=[224, 224],
                        help='input image size H [W]')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override settings in the config, key=value pairs in xxx=yyy format')
    parser.add_argument('--show-table', action='store_true', help='per-module table')
    parser.add_argument('--show-arch', action='store_true', help='per-module architecture')
    args = parser.parse_args(argv)
    if len(args.shape) == 1:
        args.shape = args.shape * 2
    if len(args.shape) != 2 or min(args.shape) < 1:
        parser.error(f'--shape takes H or H W (positive), got {args.shape}')
    return args


def mmboat_flop_handles() -> Dict[str, object]:
    """mmboat's FLOP handles (``{'mmboat::op': handle}``, plus the dense attention one)."""
    from mmboat.ops.flops import FLOP_HANDLES, register_flop_handles

    register_flop_handles()  # into mmengine's default tables, for any later analyzer too
    return dict(FLOP_HANDLES)


def build_inputs(model, scope: str, shape):
    """A preprocessed one-image batch and the data samples for ``mode='tensor'``."""
    import torch

    h, w = shape
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w), scale_factor=(1.0, 1.0),
                batch_input_shape=(h, w))
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample as Sample
    elif scope == 'mmdet':
        from mmdet.structures import DetDataSample as Sample
    else:
        from mmpretrain.structures import DataSample as Sample
    sample = Sample(metainfo=meta)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    data = model.data_preprocessor(dict(inputs=[image], data_samples=[sample]), False)
    return data['inputs'], data['data_samples']


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    from mmboat.utils import apply_stack_fixes, limit_cpu_threads

    apply_stack_fixes()
    limit_cpu_threads()
    import torch
    from mmengine.analysis import ActivationAnalyzer, FlopAnalyzer, parameter_count
    from mmengine.analysis.print_helper import (_format_size, complexity_stats_str,
                                                complexity_stats_table)
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    scope = cfg.get('default_scope', None)
    if scope not in _SCOPES:
        raise ValueError(f'config default_scope must be one of {_SCOPES}, got {scope!r}')
    importlib.import_module(f'{scope}.utils').register_all_modules(init_default_scope=False)
    init_default_scope(scope)
    import mmboat.models  # noqa: F401

    model = MODELS.build(cfg.model)
    model.eval()
    inputs, samples = build_inputs(model, scope, args.shape)

    class TensorMode(torch.nn.Module):
        """Trace ``model(inputs, samples, mode='tensor')`` with the model as the root module."""

        def __init__(self, wrapped: torch.nn.Module) -> None:
            super().__init__()
            self.model = wrapped

        def forward(self, x):
            return self.model(x, samples, mode='tensor')

    root = model if not hasattr(model, 'backbone') else TensorMode(model)
    handles = mmboat_flop_handles()
    with torch.no_grad():
        flop_analyzer = FlopAnalyzer(root, (inputs, ))
        if handles:
            flop_analyzer.set_op_handle(**handles)
        flop_analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        flops = flop_analyzer.total()
        by_operator = dict(flop_analyzer.by_operator())
        params = parameter_count(model)['']
        activations = ActivationAnalyzer(root, (inputs, )).unsupported_ops_warnings(
            False).uncalled_modules_warnings(False).total()
        unsupported = {k: v for k, v in flop_analyzer.unsupported_ops().items()
                       if k.startswith('mmboat::')}
        if args.show_table:
            print(complexity_stats_table(flop_analyzer, ActivationAnalyzer(root, (inputs, )),
                                         show_param_shapes=True))
        if args.show_arch:
            print(complexity_stats_str(flop_analyzer, ActivationAnalyzer(root, (inputs, ))))
    h, w = args.shape
    # by_operator drops the namespace: 'mmboat::na2d_forward' is listed as 'na2d_forward'.
    mmboat_names = {name.split('::')[-1] for name in handles if name.startswith('mmboat::')}
    mmboat_flops = sum(v for k, v in by_operator.items() if k in mmboat_names)
    per_op = ', '.join(f'{k} {v}' for k, v in sorted(by_operator.items(), key=lambda kv: -kv[1]))
    split = '=' * 30
    print(f'{split}\nCompute type: {scope} model, input shape: (3, {h}, {w})\n'
          f'Flops: {_format_size(flops)} (mmboat ops: {_format_size(mmboat_flops)})\n'
          f'MACs: {flops} ({per_op})\n'
          f'Params: {_format_size(params)}\nActivation: {_format_size(activations)}\n{split}')
    if unsupported:
        print(f'!!! mmboat ops without a FLOP handle (counted as 0): {unsupported}')
    print('!!!Only multiply-adds of the traced ops are counted ("FLOPs" = MACs, as in mmengine).')
    return dict(flops=flops, params=params, activations=activations, by_operator=by_operator,
                mmboat_flops=mmboat_flops,
                unsupported_mmboat_ops=unsupported, mmboat_handles=sorted(handles))


if __name__ == '__main__':
    main()
