"""The toolkit mmboat's three backbone families (NAT/DiNAT, BOAT-Swin, BOAT-CSWin) share.

One answer each to: the arch (:func:`parse_arch`: a zoo name or a dict, the same errors
everywhere), the ``out_indices`` rule (:func:`check_out_indices`: sorted, without repeats,
negative indices from the end), per-block stochastic depth (:func:`linear_drop_path`), block
index lists such as ``fsla_blocks`` (:func:`check_block_indices`), activation checkpointing
(:func:`checkpoint_forward`: only when gradients flow), the default initialisation
(:data:`DEFAULT_INIT_CFG`, applied by ``init_weights`` as mmengine does), frozen stages and
``norm_eval`` (:class:`FrozenStagesMixin`) and layer depths for layer-wise lr decay
(:func:`layer_depth`). :class:`HierarchicalBackbone` puts them together as the base class of every
mmboat backbone, :class:`FSLABackboneMixin` adds the FSLA placement and settings of the BOAT
backbones. The feed-forward network is :class:`mmboat.models.utils.MLP`.
"""
from copy import deepcopy
from typing import (Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple,
                    TypeVar, Union)

import torch
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .pretrained import PretrainedMixin

__all__ = [
    'FrozenStagesMixin', 'freeze_modules', 'set_norms_eval', 'layer_depth', 'parse_arch',
    'check_out_indices', 'linear_drop_path', 'check_block_indices', 'checkpoint_forward',
    'DEFAULT_INIT_CFG', 'HierarchicalBackbone', 'FSLABackboneMixin'
]

# Every backbone's default init_cfg: truncated-normal Linear weights (std 0.02, zero bias) and unit
# LayerNorms, as the official NAT, Swin and CSWin code initialise.
DEFAULT_INIT_CFG = [
    dict(type='TruncNormal', layer='Linear', std=.02, bias=0.),
    dict(type='Constant', layer='LayerNorm', val=1., bias=0.),
]


def parse_arch(arch: Union[str, dict], arch_zoo: Dict[str, dict], essential_keys: Collection[str],
               owner: str, optional_keys: Collection[str] = ()) -> dict:
    """Resolve ``arch``: a name in ``arch_zoo`` (any case) or a dict of exactly the essential
    keys (and optional ones), with ``depths`` and ``num_heads`` checked against each other.

    Args:
        arch (str | dict): The arch name or settings.
        arch_zoo (dict): Names to settings.
        essential_keys (Collection[str]): Keys a custom arch must give.
        owner (str): The backbone's name, for messages.
        optional_keys (Collection[str]): Keys a custom arch may give. Defaults to ().

    Returns:
        dict: A copy of the settings.

    Raises:
        ValueError: Unknown name, missing or unknown keys, inconsistent stages.
        TypeError: ``arch`` is neither a str nor a dict.
    """
    if isinstance(arch, str):
        key = arch.lower()
        if key not in arch_zoo:
            raise ValueError(f'Arch {arch!r} is not in the arch zoo of {owner}; choose one of '
                             f'{sorted(set(arch_zoo))} or pass a dict')
        return deepcopy(dict(arch_zoo[key]))
    if not isinstance(arch, dict):
        raise TypeError(f'{owner}: arch must be a str or a dict, got {type(arch).__name__}')
    missing = set(essential_keys) - set(arch)
    unknown = set(arch) - set(essential_keys) - set(optional_keys)
    if missing or unknown:
        raise ValueError(f'Custom arch of {owner} needs the keys {sorted(essential_keys)} (and '
                         f'optionally {sorted(optional_keys)}); missing {sorted(missing)}, '
                         f'unknown {sorted(unknown)}')
    arch = deepcopy(dict(arch))
    depths, heads, dims = arch['depths'], arch['num_heads'], arch['embed_dims']
    if len(depths) != len(heads) or len(depths) == 0:
        raise ValueError(f'Custom arch of {owner}: depths {list(depths)} and num_heads '
                         f'{list(heads)} must be non-empty and of equal length')
    for i, (depth, num_heads) in enumerate(zip(depths, heads)):
        if depth < 1 or num_heads < 1 or (dims * 2**i) % num_heads != 0:
            raise ValueError(f'Custom arch of {owner}: stage {i} has {depth} blocks and '
                             f'{num_heads} heads for {dims * 2**i} channels; need >= 1 block and '
                             'heads dividing the channels')
    return arch


def check_out_indices(out_indices: Union[int, Sequence[int]], num_stages: int) -> Tuple[int, ...]:
    """The stages to output: an int or a non-empty sequence, negative counting from the end;
    returned sorted and without repeats (the outputs come in stage order).

    Raises:
        TypeError: Not an int or a non-empty sequence.
        ValueError: An index out of range.
    """
    if isinstance(out_indices, int):
        out_indices = [out_indices]
    if not isinstance(out_indices, Sequence) or len(out_indices) == 0:
        raise TypeError(f'out_indices must be an int or a non-empty sequence of ints, got '
                        f'{out_indices!r}')
    normalized = []
    for index in out_indices:
        if not -num_stages <= index < num_stages:
            raise ValueError(f'out_indices entry {index} is out of range for {num_stages} '
                             'stages')
        normalized.append(index % num_stages)
    return tuple(sorted(set(normalized)))


def linear_drop_path(drop_path_rate: float, num_blocks: int) -> List[float]:
    """Stochastic depth rates rising linearly from 0 to ``drop_path_rate`` over the blocks."""
    return [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]


def check_block_indices(blocks: Sequence[Sequence[int]], depths: Sequence[int],
                        name: str) -> Tuple[Tuple[int, ...], ...]:
    """One list of block indices per stage (e.g. ``fsla_blocks``), each inside its stage;
    returned sorted and without repeats.

    Raises:
        ValueError: Not one list per stage, or an index outside its stage.
    """
    if len(blocks) != len(depths):
        raise ValueError(f'{name} needs one list per stage ({len(depths)}), got {len(blocks)}')
    for i, (stage, depth) in enumerate(zip(blocks, depths)):
        bad = [j for j in stage if not 0 <= j < depth]
        if bad:
            raise ValueError(f'{name}[{i}] has block indices {bad} outside stage {i} of depth '
                             f'{depth}')
    return tuple(tuple(sorted(set(int(j) for j in stage))) for stage in blocks)


def checkpoint_forward(forward: Callable[..., torch.Tensor], with_cp: bool, x: torch.Tensor,
                       *args) -> torch.Tensor:
    """``forward(x, *args)``, under activation checkpointing when ``with_cp`` and gradients flow
    (in inference or under ``no_grad`` checkpointing only costs time)."""
    if with_cp and x.requires_grad and torch.is_grad_enabled():
        return cp.checkpoint(forward, x, *args, use_reentrant=False)
    return forward(x, *args)

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)

_Self = TypeVar('_Self', bound='FrozenStagesMixin')


def freeze_modules(modules: Iterable[nn.Module]) -> None:
    """Put ``modules`` in eval mode and stop the gradients of all their parameters."""
    for module in modules:
        module.eval()
        for param in module.parameters():
            param.requires_grad = False


def set_norms_eval(module: nn.Module) -> None:
    """Put every LayerNorm, GroupNorm and BatchNorm inside ``module`` in eval mode."""
    for child in module.modules():
        if isinstance(child, NORM_TYPES):
            child.eval()


class FrozenStagesMixin:
    """``_freeze_stages()`` and a ``train()`` that keeps frozen parts and norms in eval mode.

    Put it before the ``nn.Module`` base: ``class Backbone(FrozenStagesMixin, BaseModule)``.
    The backbone sets ``frozen_stages`` (-1: nothing; 0: the stem; k: the stem and stages
    ``0..k-1`` with their output norms ``norm{i}``), ``norm_eval``, ``out_indices`` and
    ``num_stages`` (:meth:`_set_freezing` checks and sets the first two), names its stem in
    ``stem_name`` and lists the modules of stage ``i`` in :meth:`_stage_modules`.
    """
    stem_name: str = 'patch_embed'
    frozen_stages: int
    norm_eval: bool
    out_indices: Sequence[int]
    num_stages: int

    def _set_freezing(self, frozen_stages: int, norm_eval: bool) -> None:
        """Check ``frozen_stages`` against ``num_stages`` and store it with ``norm_eval``."""
        if not -1 <= frozen_stages <= self.num_stages:
            raise ValueError(f'frozen_stages must be in [-1, {self.num_stages}], '
                             f'got {frozen_stages}')
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval

    def _stage_modules(self, index: int) -> List[nn.Module]:
        """The modules (blocks and downsampler) of stage ``index``."""
        raise NotImplementedError

    def _frozen_modules(self) -> List[nn.Module]:
        """The stem, the first ``frozen_stages`` stages and their output norms."""
        frozen: List[nn.Module] = []
        if self.frozen_stages >= 0:
            frozen.append(getattr(self, self.stem_name))
        for i in range(min(self.frozen_stages, self.num_stages)):
            frozen.extend(self._stage_modules(i))
            if i in self.out_indices:
                frozen.append(getattr(self, f'norm{i}'))
        return frozen

    def _freeze_stages(self) -> None:
        freeze_modules(self._frozen_modules())

    def train(self: _Self, mode: bool = True) -> _Self:
        """Set train mode, keeping frozen stages (and norms with ``norm_eval``) in eval mode."""
        super().train(mode)  # type: ignore[misc]
        self._freeze_stages()
        if mode and self.norm_eval:
            set_norms_eval(self)  # type: ignore[arg-type]
        return self


def layer_depth(param_name: str,
                prefix: str,
                depths: Sequence[int],
                stem_name: str,
                stages_name: str,
                merge_name: Optional[str] = None) -> Tuple[int, int]:
    """Layer depth of a parameter, for layer-wise learning-rate decay.

    The stem is layer 0, block ``j`` of stage ``i`` is ``sum(depths[:i]) + j + 1``, a
    downsampler is the depth of its stage's last block, and everything else (output norms,
    names outside ``prefix``) is the last layer.

    Args:
        param_name (str): parameter name, e.g. ``backbone.layers.2.blocks.3.mlp.fc1.weight``.
        prefix (str): prefix of the backbone's parameters, e.g. ``'backbone.'``.
        depths (Sequence[int]): blocks per stage.
        stem_name (str): name of the stem module (the first name component).
        stages_name (str): with ``merge_name`` None, the stage list
            (``{stages_name}.{i}.blocks.{j}``, anything else under stage ``i`` is its
            downsampler); otherwise the prefix of the 1-based flat stages
            ``{stages_name}{k}.{j}``.
        merge_name (str, optional): prefix of the 1-based downsamplers ``{merge_name}{k}`` after
            stage ``k``, for flat stages. Defaults to None.

    Returns:
        tuple: (layer depth, number of layers ``sum(depths) + 2``).
    """
    num_layers = sum(depths) + 2
    last = num_layers - 1, num_layers
    if not param_name.startswith(prefix):
        return last
    parts = param_name[len(prefix):].split('.')
    head = parts[0]
    if head == stem_name:
        return 0, num_layers
    if merge_name is None:
        if head == stages_name and len(parts) > 2:
            stage = int(parts[1])
            if parts[2] == 'blocks':
                return sum(depths[:stage]) + int(parts[3]) + 1, num_layers
            return sum(depths[:stage + 1]), num_layers
        return last
    if head.startswith(stages_name) and head[len(stages_name):].isdigit():
        stage = int(head[len(stages_name):]) - 1
        return sum(depths[:stage]) + int(parts[1]) + 1, num_layers
    if head.startswith(merge_name) and head[len(merge_name):].isdigit():
        return sum(depths[:int(head[len(merge_name):])]), num_layers
    return last


class HierarchicalBackbone(FrozenStagesMixin, PretrainedMixin, BaseModule):
    """Base class of mmboat's 4-stage backbones.

    Sets, from the common arguments: ``arch_settings`` (:func:`parse_arch` over the class's
    ``arch_zoo``, ``essential_keys`` and ``optional_keys``), ``embed_dims``, ``depths``,
    ``num_heads``, ``num_stages``, ``num_features`` (channels double per stage),
    ``out_indices`` (:func:`check_out_indices`), ``frozen_stages`` / ``norm_eval``
    (:class:`FrozenStagesMixin`) and the default ``init_cfg`` (:data:`DEFAULT_INIT_CFG`; a
    ``Pretrained`` one goes through :class:`PretrainedMixin`). A subclass names its stem, its
    stage list and (for flat stage names) its downsamplers in ``layer_names`` for
    :meth:`get_layer_depth`, builds its modules, then calls ``self._freeze_stages()``.

    Args:
        arch (str | dict): A name in ``arch_zoo`` or a dict of the arch keys.
        out_indices (int | Sequence[int]): Stages to output.
        frozen_stages (int): See :class:`FrozenStagesMixin`.
        norm_eval (bool): Keep norms in eval mode while training.
        init_cfg (dict | list[dict], optional): Initialisation; None is
            :data:`DEFAULT_INIT_CFG`.
    """
    arch_zoo: Dict[str, dict] = {}
    essential_keys: Collection[str] = ('embed_dims', 'depths', 'num_heads')
    optional_keys: Collection[str] = ()
    # (stem, stages, downsamplers): see :func:`layer_depth`.
    layer_names: Tuple[str, str, Optional[str]] = ('patch_embed', 'layers', None)

    def __init__(self, arch: Union[str, dict], out_indices: Union[int, Sequence[int]],
                 frozen_stages: int, norm_eval: bool,
                 init_cfg: Optional[Union[dict, List[dict]]]) -> None:
        super().__init__(init_cfg=deepcopy(DEFAULT_INIT_CFG) if init_cfg is None else init_cfg)
        self.arch_settings = parse_arch(arch, self.arch_zoo, self.essential_keys,
                                        type(self).__name__, self.optional_keys)
        self.embed_dims = int(self.arch_settings['embed_dims'])
        self.depths: List[int] = [int(d) for d in self.arch_settings['depths']]
        self.num_heads: List[int] = [int(h) for h in self.arch_settings['num_heads']]
        self.num_stages = len(self.depths)
        self.num_features = [self.embed_dims * 2**i for i in range(self.num_stages)]
        self.out_indices = check_out_indices(out_indices, self.num_stages)
        self._set_freezing(frozen_stages, norm_eval)

    def get_layer_depth(self, param_name: str, prefix: str = '') -> Tuple[int, int]:
        """Layer depth of a parameter, for layer-wise learning-rate decay
        (mmpretrain's ``LearningRateDecayOptimWrapperConstructor``).

        The stem is layer 0, block ``j`` of stage ``i`` is ``sum(depths[:i]) + j + 1``, a
        downsampler belongs to the last block of its stage; output norms and everything outside
        the backbone (names not starting with ``prefix``) are the last layer.

        Args:
            param_name (str): Parameter name, e.g. ``backbone.levels.2.blocks.3.mlp.fc1.weight``.
            prefix (str): Prefix of the backbone's parameters (e.g. ``'backbone.'``).
                Defaults to ''.

        Returns:
            tuple[int, int]: The layer depth and the number of layers (``sum(depths) + 2``).
        """
        return layer_depth(param_name, prefix, self.depths, *self.layer_names)


class FSLABackboneMixin:
    """The feature-space local attention part of the BOAT backbones: which blocks hold FSLA
    (``fsla_blocks``) and its settings (``fsla_cfg``, resolved over the class's
    ``default_fsla_cfg``, the settings its released weights were trained with). Put it before
    :class:`HierarchicalBackbone` in the bases."""
    default_fsla_cfg: Dict[str, object] = {}
    depths: List[int]

    def _set_fsla(self, fsla_blocks: Sequence[Sequence[int]],
                  fsla_cfg: Optional[dict]) -> None:
        from mmboat.models.layers.feature_space_attention import resolve_fsla_cfg

        self.fsla_blocks = check_block_indices(fsla_blocks, self.depths, 'fsla_blocks')
        self.fsla_cfg = resolve_fsla_cfg(fsla_cfg, self.default_fsla_cfg, type(self).__name__)

    def block_fsla_cfg(self, stage: int, block: int) -> Optional[dict]:
        """The FSLA settings of a block, None for a block without FSLA."""
        return self.fsla_cfg if block in self.fsla_blocks[stage] else None

    @property
    def num_fsla_modules(self) -> int:
        """How many FSLA modules the backbone holds."""
        return sum(len(b) for b in self.fsla_blocks)
