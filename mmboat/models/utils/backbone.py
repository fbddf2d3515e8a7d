"""The surface the hierarchical backbones share: frozen stages, ``norm_eval``, layer depths."""
from typing import Iterable, List, Optional, Sequence, Tuple, TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['FrozenStagesMixin', 'freeze_modules', 'set_norms_eval', 'layer_depth']

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
        param_name: parameter name, e.g. ``backbone.layers.2.blocks.3.mlp.fc1.weight``.
        prefix: prefix of the backbone's parameters, e.g. ``'backbone.'``.
        depths: blocks per stage.
        stem_name: name of the stem module (the first name component).
        stages_name: with ``merge_name`` None, the stage list (``{stages_name}.{i}.blocks.{j}``,
            anything else under stage ``i`` is its downsampler); otherwise the prefix of the
            1-based flat stages ``{stages_name}{k}.{j}``.
        merge_name: prefix of the 1-based downsamplers ``{merge_name}{k}`` after stage ``k``, for
            flat stages. Defaults to None.

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
