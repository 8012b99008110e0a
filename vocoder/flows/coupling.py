"""WaveGlow's affine coupling.

:class:`AffineCoupling` splits ``x [B, C, T]`` into ``x_a = x[:, :C/2]`` and
``x_b = x[:, C/2:]``; ``WN(x_a, cond)`` (:class:`~vocoder.nn.wn.WN`) gives ``t`` (first half of
its output) and ``log_s`` (second half), and ``y = (x_a, exp(log_s) * x_b + t)`` with
``log_det = sum(log_s)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vocoder.nn.wn import WN


class AffineCoupling(nn.Module):
    """Affine coupling over ``channels`` (even) conditioned on ``cond [B, n_cond, T]``."""

    def __init__(self, channels: int, n_cond: int, n_layers: int = 8, n_channels: int = 256,
                 kernel_size: int = 3, weight_norm: bool = True):
        super().__init__()
        if channels % 2 != 0 or channels < 2:
            raise ValueError(f"affine coupling needs an even channel count, got {channels}")
        self.n_half = channels // 2
        self.net = WN(self.n_half, n_cond, n_layers, n_channels, kernel_size, weight_norm)

    def _shift_log_scale(self, x_a: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(x_a, cond)
        return out[:, :self.n_half], out[:, self.n_half:]

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, C, T]`` -> ``(y [B, C, T], log_det [B])`` (nats)."""
        x_a, x_b = x[:, :self.n_half], x[:, self.n_half:]
        t, log_s = self._shift_log_scale(x_a, cond)
        y_b = torch.exp(log_s) * x_b + t
        log_det = log_s.sum(dim=(1, 2), dtype=torch.promote_types(log_s.dtype, torch.float32))
        return torch.cat([x_a, y_b], dim=1), log_det

    def inverse(self, y: Tensor, cond: Tensor) -> Tensor:
        """``y [B, C, T]`` -> ``x``, the exact inverse of :meth:`forward`."""
        y_a, y_b = y[:, :self.n_half], y[:, self.n_half:]
        t, log_s = self._shift_log_scale(y_a, cond)
        return torch.cat([y_a, (y_b - t) * torch.exp(-log_s)], dim=1)
