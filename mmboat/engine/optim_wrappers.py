"""Mixed-precision training on a machine without a GPU.

mmengine's ``AmpOptimWrapper`` (float16 autocast with a ``GradScaler``) asserts that a GPU is
present, so every AMP config stops at its constructor on a CPU machine.
:class:`CPUAmpOptimWrapper` is what mmboat's ``tools/train.py`` puts in its place there (after
one warning, see :func:`mmboat.engine.runner_setup.configure_amp`): the forward pass runs under
``torch.autocast('cpu', dtype=torch.bfloat16)``, the parameters, gradients and optimizer state
stay float32. bfloat16 has float32's exponent range, so no loss scaling is needed.
"""
from contextlib import contextmanager
from typing import Optional, Union

import torch
from mmengine.optim import OptimWrapper
from torch import nn

from mmboat.registry import OPTIM_WRAPPERS

__all__ = ['CPUAmpOptimWrapper']


@OPTIM_WRAPPERS.register_module()
class CPUAmpOptimWrapper(OptimWrapper):
    """``OptimWrapper`` whose forward runs under CPU bfloat16 autocast.

    Takes ``AmpOptimWrapper``'s arguments, so an AMP config's ``optim_wrapper`` works unchanged
    with ``type='mmboat.CPUAmpOptimWrapper'``.

    Args:
        loss_scale (float | str | dict): ``AmpOptimWrapper``'s loss scaling; not needed in
            bfloat16, accepted and unused. Defaults to ``'dynamic'``.
        dtype (str | torch.dtype, optional): Autocast dtype of the config. CPU autocast runs in
            bfloat16; ``None``, ``'bfloat16'`` and ``'float16'`` (the GPU default, replaced by
            bfloat16) are accepted. Defaults to None.
        use_fsdp (bool): Accepted for compatibility; must be False. Defaults to False.
        **kwargs: :class:`mmengine.optim.OptimWrapper`'s arguments (``optimizer``,
            ``accumulative_counts``, ``clip_grad``).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> wrapper = CPUAmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        >>> with wrapper.optim_context(model):
        ...     out = model(torch.randn(3, 4))
        >>> out.dtype
        torch.bfloat16
    """

    valid_dtypes = (None, 'bfloat16', 'float16', torch.bfloat16, torch.float16)

    def __init__(self,
                 loss_scale: Union[float, str, dict] = 'dynamic',
                 dtype: Optional[Union[str, torch.dtype]] = None,
                 use_fsdp: bool = False,
                 **kwargs) -> None:
        if dtype not in self.valid_dtypes:
            raise ValueError(f'{type(self).__name__}: CPU autocast runs in bfloat16; dtype must '
                             f'be one of None, "bfloat16" or "float16", got {dtype!r}')
        if use_fsdp:
            raise ValueError(f'{type(self).__name__}: use_fsdp=True needs GPUs')
        super().__init__(**kwargs)
        self.loss_scale = loss_scale
        self.cast_dtype = torch.bfloat16

    def load_state_dict(self, state_dict: dict) -> None:
        """Load the optimizer state; a GPU AMP checkpoint's ``loss_scaler`` entry is dropped."""
        state_dict = dict(state_dict)
        state_dict.pop('loss_scaler', None)
        super().load_state_dict(state_dict)

    @contextmanager
    def optim_context(self, model: nn.Module):
        """The base context (gradient accumulation) plus CPU bfloat16 autocast."""
        with super().optim_context(model), torch.autocast('cpu', dtype=self.cast_dtype):
            yield
