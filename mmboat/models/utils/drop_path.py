"""Stochastic depth (per-sample residual-branch dropout)."""
from torch import Tensor, nn

__all__ = ['drop_path', 'DropPath']


def drop_path(x: Tensor, drop_prob: float = 0., training: bool = False) -> Tensor:
    """Zero the whole residual branch of random samples and rescale the others.

    `Deep Networks with Stochastic Depth <https://arxiv.org/abs/1603.09382>`_.

    Args:
        x (Tensor): ``[B, ...]`` branch output.
        drop_prob (float): Probability of dropping a sample's branch. Defaults to 0.
        training (bool): Only active in training. Defaults to False.

    Returns:
        Tensor: same shape as ``x``.
    """
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1. - drop_prob
    shape = (x.shape[0], ) + (1, ) * (x.dim() - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    return x * mask.div_(keep_prob)


class DropPath(nn.Module):
    """Module form of :func:`drop_path`.

    Args:
        drop_prob (float): Probability of dropping a sample's branch. Defaults to 0.
    """

    def __init__(self, drop_prob: float = 0.) -> None:
        super().__init__()
        if not 0. <= drop_prob < 1.:
            raise ValueError(f'drop_prob must be in [0, 1), got {drop_prob}')
        self.drop_prob = drop_prob

    def extra_repr(self) -> str:
        return f'drop_prob={self.drop_prob}'

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)
