"""WaveGlow's affine coupling and the non-causal WaveNet-like network (WN) inside it.

:class:`WN` keeps NVIDIA's layout, so published weights map onto it one to one:

* ``start``: 1x1 conv ``n_in -> n_channels`` (weight norm);
* ``in_layers[i]``: conv ``n_channels -> 2 * n_channels``, kernel ``kernel_size``, dilation
  ``2**i``, padded on both sides (non-causal) (weight norm);
* ``cond_layer``: one 1x1 conv ``n_cond -> 2 * n_channels * n_layers`` giving every layer's
  conditioning at once, layer ``i`` reading channels ``[2 C i, 2 C (i + 1))`` (weight norm);
* gate ``tanh(a) * sigmoid(b)`` on the two halves of ``in_layers[i](h) + cond_i``;
* ``res_skip_layers[i]``: 1x1 conv to ``2 * n_channels`` (first half residual, second half
  skip), the last layer to ``n_channels`` (skip only) (weight norm);
* ``end``: 1x1 conv from the summed skips to ``2 * n_in``, zero-initialised so that a fresh
  coupling is the identity.

:class:`AffineCoupling` splits ``x [B, C, T]`` into ``x_a = x[:, :C/2]`` and
``x_b = x[:, C/2:]``; ``WN(x_a, cond)`` gives ``t`` (first half of its output) and ``log_s``
(second half), and ``y = (x_a, exp(log_s) * x_b + t)`` with ``log_det = sum(log_s)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as _weight_norm


def _conv(n_in: int, n_out: int, kernel_size: int = 1, dilation: int = 1,
          weight_norm: bool = True) -> nn.Conv1d:
    conv = nn.Conv1d(n_in, n_out, kernel_size, dilation=dilation,
                     padding=dilation * (kernel_size - 1) // 2)
    return _weight_norm(conv) if weight_norm else conv


def gated_activation(in_act: Tensor, n_channels: int) -> Tensor:
    """``tanh(in_act[:, :C]) * sigmoid(in_act[:, C:])``; in place when no gradient is needed."""
    a, b = in_act[:, :n_channels], in_act[:, n_channels:]
    if in_act.requires_grad:
        return torch.tanh(a) * torch.sigmoid(b)
    return a.tanh_().mul_(b.sigmoid_())


class WN(nn.Module):
    """``x_a [B, n_in, T]``, ``cond [B, n_cond, T]`` -> ``[B, 2 * n_in, T]`` (``t``, ``log_s``)."""

    def __init__(self, n_in: int, n_cond: int, n_layers: int = 8, n_channels: int = 256,
                 kernel_size: int = 3, weight_norm: bool = True):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (centred convolution), got {kernel_size}")
        self.n_layers = n_layers
        self.n_channels = n_channels
        self.start = _conv(n_in, n_channels, weight_norm=weight_norm)
        self.cond_layer = _conv(n_cond, 2 * n_channels * n_layers, weight_norm=weight_norm)
        self.in_layers = nn.ModuleList(
            _conv(n_channels, 2 * n_channels, kernel_size, 2**i, weight_norm)
            for i in range(n_layers)
        )
        self.res_skip_layers = nn.ModuleList(
            _conv(n_channels, 2 * n_channels if i < n_layers - 1 else n_channels,
                  weight_norm=weight_norm)
            for i in range(n_layers)
        )
        self.end = nn.Conv1d(n_channels, 2 * n_in, 1)
        nn.init.zeros_(self.end.weight)
        nn.init.zeros_(self.end.bias)

    def forward(self, x_a: Tensor, cond: Tensor) -> Tensor:
        h = self.start(x_a)
        cond = self.cond_layer(cond)
        width = 2 * self.n_channels
        skip = None
        for i, (in_layer, res_skip_layer) in enumerate(zip(self.in_layers,
                                                             self.res_skip_layers)):
            in_act = in_layer(h)
            in_act = in_act + cond[:, i * width:(i + 1) * width]
            res_skip = res_skip_layer(gated_activation(in_act, self.n_channels))
            if i < self.n_layers - 1:
                h = h + res_skip[:, :self.n_channels]
                res_skip = res_skip[:, self.n_channels:]
            skip = res_skip if skip is None else skip + res_skip
        return self.end(skip)

    @torch.no_grad()
    def fuse_for_inference(self) -> None:
        """Rewrite into an equivalent, cheaper inference form (one way; idempotent).

        Removes weight norm; moves the ``in_layers`` biases into ``cond_layer``'s bias; and,
        since the skip path is linear up to ``end``, folds ``end`` into the skip halves of
        ``res_skip_layers`` (each then emits ``2 * n_in`` skip channels instead of
        ``n_channels``) and replaces ``end`` by the identity. The state dict changes shape:
        save checkpoints before calling this.
        """
        for conv in [self.start, self.cond_layer, *self.in_layers, *self.res_skip_layers]:
            if parametrize.is_parametrized(conv):
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        if isinstance(self.end, nn.Identity):
            return
        width = 2 * self.n_channels
        cond_bias = self.cond_layer.bias.double().clone()
        for i, in_layer in enumerate(self.in_layers):
            cond_bias[i * width:(i + 1) * width] += in_layer.bias.double()
            in_layer.bias = None
        self.cond_layer.bias.copy_(cond_bias)

        end_w = self.end.weight.double()[:, :, 0]  # [2 n_in, C]
        end_b = self.end.bias.double()
        total_skip_bias = end_b.clone()
        for i, layer in enumerate(self.res_skip_layers):
            w, b = layer.weight.double()[:, :, 0], layer.bias.double()
            n_res = self.n_channels if i < self.n_layers - 1 else 0
            skip_w = end_w @ w[n_res:]
            total_skip_bias += end_w @ b[n_res:]
            new_w = torch.cat([w[:n_res], skip_w])
            new_b = torch.cat([b[:n_res], torch.zeros_like(skip_w[:, 0])])
            fused = nn.Conv1d(new_w.shape[1], new_w.shape[0], 1).to(layer.weight)
            fused.weight.copy_(new_w.unsqueeze(-1))
            fused.bias.copy_(new_b)
            self.res_skip_layers[i] = fused
        last = self.res_skip_layers[-1]
        last.bias[-end_w.shape[0]:] += total_skip_bias.to(last.bias)
        self.end = nn.Identity()


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
