"""The transformer feed-forward network of every mmboat backbone."""
from torch import Tensor, nn

__all__ = ['MLP']


class MLP(nn.Module):
    """``fc1 -> GELU -> dropout -> fc2 -> dropout`` on the last axis.

    The parameter names (``fc1``, ``fc2``) are those of the released NAT, Swin and CSWin weights.

    Args:
        embed_dims (int): Input and output channels.
        hidden_dims (int): Hidden channels.
        drop (float): Dropout after each linear. Defaults to 0.
    """

    def __init__(self, embed_dims: int, hidden_dims: int, drop: float = 0.) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, embed_dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
