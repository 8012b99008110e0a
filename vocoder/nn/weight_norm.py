"""The one weight-norm mechanism of the package: :class:`WeightNormConv1d`, used by the
teacher's and student's WaveNets and by WaveGlow's WN alike.

Written out rather than taken from ``torch.nn.utils.parametrizations``: deep copies (EMA
models) of parametrised modules share one dynamically created class, so removing weight norm
from one copy breaks the other; and the parameter names ``weight_g``/``weight_v`` are those of
NVIDIA's published WaveGlow weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class WeightNormConv1d(nn.Conv1d):
    """``Conv1d`` whose weight is ``weight_g * weight_v / ||weight_v||`` (norm over each output
    channel), stored under the parameter names of torch's classic ``weight_norm`` hook."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        v = self.weight.detach().clone()
        del self.weight
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(v, dim=(1, 2), keepdim=True))

    @classmethod
    def from_conv(cls, conv: nn.Conv1d) -> WeightNormConv1d:
        """A weight-normalised copy of ``conv`` computing the same function."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                  padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                  bias=conv.bias is not None).to(conv.weight)
        with torch.no_grad():
            new.weight_v.copy_(conv.weight)
            new.weight_g.copy_(torch.linalg.vector_norm(conv.weight, dim=(1, 2), keepdim=True))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        return new

    def effective_weight(self) -> Tensor:
        norm = torch.linalg.vector_norm(self.weight_v, dim=(1, 2), keepdim=True)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def without_weight_norm(self) -> nn.Conv1d:
        """A plain ``Conv1d`` computing the same function."""
        conv = nn.Conv1d(self.in_channels, self.out_channels, self.kernel_size,
                         stride=self.stride, padding=self.padding, dilation=self.dilation,
                         groups=self.groups, bias=self.bias is not None).to(self.weight_v)
        conv.weight.copy_(self.effective_weight())
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv


def conv_weight(conv: nn.Conv1d) -> Tensor:
    """The weight ``conv`` applies, weight-normalised or not."""
    return conv.effective_weight() if isinstance(conv, WeightNormConv1d) else conv.weight


def plain(conv: nn.Module) -> nn.Module:
    """``conv`` without weight norm (itself when it has none)."""
    return conv.without_weight_norm() if isinstance(conv, WeightNormConv1d) else conv


def remove_weight_norm(module: nn.Module) -> None:
    """Replace every :class:`WeightNormConv1d` below ``module`` by the plain ``Conv1d`` it
    computes (in place; outputs unchanged). Idempotent."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, WeightNormConv1d):
                setattr(parent, name, child.without_weight_norm())


def migrate_parametrized_keys(state_dict: dict, prefix: str) -> None:
    """Rename, in place, the keys torch's ``parametrizations.weight_norm`` gives
    (``<conv>.parametrizations.weight.original0/1``) to :class:`WeightNormConv1d`'s
    (``<conv>.weight_g/weight_v``): checkpoints written before session 8 stored the teacher's and
    student's weight norm that way."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in ((".parametrizations.weight.original0", ".weight_g"),
                         (".parametrizations.weight.original1", ".weight_v")):
            if key.endswith(old):
                state_dict[key[:-len(old)] + new] = state_dict.pop(key)
