"""WaveGlow's non-causal WaveNet-like network (WN), in its training and its fused inference
form.

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

Weight norm is :class:`~vocoder.nn.weight_norm.WeightNormConv1d` (parameter names
``weight_g``/``weight_v``, norm per output channel).
:meth:`WN.fuse_for_inference` rewrites it with the baking rewrites of
:mod:`vocoder.nn.baking` (one-sigmoid gate, first layer through ``start``) plus ``end``
folded into the skip 1x1s.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vocoder.nn.baking import double_filter_half, fold_input_affine, gate_
from vocoder.nn.weight_norm import WeightNormConv1d, plain


def _conv(n_in: int, n_out: int, kernel_size: int = 1, dilation: int = 1,
          weight_norm: bool = True) -> nn.Conv1d:
    cls = WeightNormConv1d if weight_norm else nn.Conv1d
    return cls(n_in, n_out, kernel_size, dilation=dilation,
               padding=dilation * (kernel_size - 1) // 2)


def gated_activation(in_act: Tensor, n_channels: int) -> Tensor:
    """``tanh(a) * sigmoid(b)`` of the channel halves (dim -2) of ``in_act``; in place when
    no gradient is needed."""
    a, b = in_act.narrow(-2, 0, n_channels), in_act.narrow(-2, n_channels, n_channels)
    if in_act.requires_grad:
        return torch.tanh(a) * torch.sigmoid(b)
    return a.tanh_().mul_(b.sigmoid_())


def _fused_gate(in_act: Tensor, n_channels: int) -> Tensor:
    """The gate of a fused WN (channels on dim -2), see :func:`vocoder.nn.baking.gate_`."""
    return gate_(in_act, dim=-2)


CPU_BLOCK_COLUMNS = 512
"""Time steps per block of :meth:`WN._forward_gemm` on CPU (``None``: one block)."""


def _add_dilated_taps(out: Tensor, weight: Tensor, h: Tensor, dilation: int,
                      start: int = 0) -> None:
    """``out [O, t1 - t0] += conv1d(h [I, T], weight [O, I, K])[:, t0:t1]`` (centred, zero
    padded, ``t0 = start``), one GEMM per tap accumulated straight into ``out``."""
    n, centre = h.shape[-1], (weight.shape[-1] - 1) // 2
    stop = start + out.shape[-1]
    for k in range(weight.shape[-1]):
        offset = (k - centre) * dilation
        # output columns t in [start, stop) read h[:, t + offset], which exists for
        # t in [-offset, n - offset)
        first, last = max(start, -offset), min(stop, n - offset)
        if first < last:
            out[:, first - start:last - start].addmm_(weight[:, :, k],
                                                      h[:, first + offset:last + offset])


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

    @property
    def fused(self) -> bool:
        """Whether :meth:`fuse_for_inference` has run."""
        return isinstance(self.end, nn.Identity)

    def forward(self, x_a: Tensor, cond: Tensor) -> Tensor:
        if (self.fused and not torch.is_grad_enabled() and x_a.device.type == "cpu"
                and not torch.compiler.is_compiling()):
            return torch.stack([self._forward_gemm(a, c) for a, c in zip(x_a, cond, strict=True)])
        return self._forward_conv(x_a, cond)

    def _forward_conv(self, x_a: Tensor, cond: Tensor) -> Tensor:
        """The layers as batched convolutions: training, CUDA (cuDNN, whole batch at once) and
        ``torch.compile`` (whose graphs the in-place ``out=`` GEMMs of :meth:`_forward_gemm`
        would break). Also valid after :meth:`fuse_for_inference`, whose layers compute the
        same function with ``end`` folded in."""
        h = self.start(x_a)
        cond = self.cond_layer(cond)
        width = 2 * self.n_channels
        skip = None
        gate = _fused_gate if self.fused else gated_activation
        # Fused, the first layer reads (x_a, 1) (see fuse_for_inference); its zero padding
        # then pads the constant channel with zeros too, as it padded start(x_a).
        first = (torch.cat([x_a, torch.ones_like(x_a[:, :1])], dim=1) if self.fused else h)
        for i, (in_layer, res_skip_layer) in enumerate(zip(self.in_layers, self.res_skip_layers,
                                                             strict=True)):
            in_act = in_layer(first if i == 0 else h) + cond[:, i * width:(i + 1) * width]
            res_skip = res_skip_layer(gate(in_act, self.n_channels))
            if i < self.n_layers - 1:
                h = h + res_skip[:, :self.n_channels]
                res_skip = res_skip[:, self.n_channels:]
            skip = res_skip if skip is None else skip + res_skip
        return self.end(skip)

    def _forward_gemm(self, x_a: Tensor, cond: Tensor) -> Tensor:
        """CPU inference form on one item, ``[n_in, T]`` -> ``[2 n_in, T]``: every convolution
        is a GEMM (or one per tap) accumulating into its output, which on CPU beats
        ``conv1d``'s layout reorders, and the conditioning of layer ``i`` is computed right
        where it is added.

        Each layer runs in blocks of :data:`CPU_BLOCK_COLUMNS` time steps, so a block's
        gate stays in cache from its conditioning GEMM to the 1x1s after it; the residual then
        goes to a second buffer, because the next blocks' taps still read the layer's input.
        (At ``paper`` size on 2 CPU cores: a median 4% faster over 12 paired rounds.)
        """
        n = x_a.shape[-1]
        step = CPU_BLOCK_COLUMNS or n
        h = torch.addmm(self.start.bias[:, None], self.start.weight[:, :, 0], x_a)
        first = torch.cat([x_a, torch.ones_like(x_a[:1])])  # the first layer's input rows
        following = torch.empty_like(h) if step < n else h
        cond_weight, cond_bias = self.cond_layer.weight[:, :, 0], self.cond_layer.bias[:, None]
        width = 2 * self.n_channels
        gate = h.new_empty(width, min(step, n))
        # Every layer adds the same 2 n_in skip channels (``end`` is folded in); the last
        # layer's 1x1 emits only those.
        skip = h.new_empty(self.res_skip_layers[-1].weight.shape[0], n)
        for i, (in_layer, res_skip_layer) in enumerate(zip(self.in_layers, self.res_skip_layers,
                                                             strict=True)):
            rows = slice(i * width, (i + 1) * width)
            weight, bias = res_skip_layer.weight[:, :, 0], res_skip_layer.bias[:, None]
            n_res = self.n_channels if i < self.n_layers - 1 else 0
            for start in range(0, n, step):
                stop = min(start + step, n)
                in_act = torch.addmm(cond_bias[rows], cond_weight[rows], cond[:, start:stop],
                                     out=gate[:, :stop - start])
                _add_dilated_taps(in_act, in_layer.weight, first if i == 0 else h,
                                  in_layer.dilation[0], start)
                acts = gate_(in_act, dim=-2)
                if n_res:
                    torch.addmm(h[:, start:stop], weight[:n_res], acts,
                                out=following[:, start:stop]).add_(bias[:n_res])
                if i == 0:
                    torch.addmm(bias[n_res:], weight[n_res:], acts, out=skip[:, start:stop])
                else:
                    skip[:, start:stop].addmm_(weight[n_res:], acts).add_(bias[n_res:])
            if n_res and following is not h:
                h, following = following, h
        return skip

    @torch.no_grad()
    def fuse_for_inference(self) -> None:
        """Rewrite into an equivalent, cheaper inference form (one way; idempotent).

        Removes weight norm; moves the ``in_layers`` biases into ``cond_layer``'s bias and
        stores their weights tap-major; and, since the skip path is linear up to ``end``, folds
        ``end`` into the skip halves of ``res_skip_layers`` (each then emits ``2 * n_in`` skip
        channels instead of ``n_channels``) and replaces ``end`` by the identity. The baking
        rewrites of :mod:`vocoder.nn.baking` then apply: for the one-sigmoid gate the filter
        half of every layer's gate input (its ``in_layers`` and ``cond_layer`` rows, bias
        included) is doubled and the ``res_skip_layers`` weights negated; the first layer's
        taps are folded through ``start`` (``start(x_a)`` is affine in the ``n_in`` channels of
        ``x_a``), so ``in_layers[0]`` reads ``(x_a, 1)``, ``n_in + 1`` channels instead of
        ``n_channels``. Afterwards :meth:`forward` without
        autograd runs :meth:`_forward_gemm` on CPU. The state dict changes layout: save
        checkpoints before calling this.
        """
        if self.fused:
            return
        self.start, self.cond_layer = plain(self.start), plain(self.cond_layer)
        self.in_layers = nn.ModuleList(map(plain, self.in_layers))
        self.res_skip_layers = nn.ModuleList(map(plain, self.res_skip_layers))
        width = 2 * self.n_channels
        cond_bias = self.cond_layer.bias.double().clone()
        for i, in_layer in enumerate(self.in_layers):
            rows = slice(i * width, (i + 1) * width)
            cond_bias[rows] = double_filter_half(cond_bias[rows] + in_layer.bias.double())
            self.cond_layer.weight[rows] = double_filter_half(self.cond_layer.weight[rows])
            in_layer.bias = None
            w = double_filter_half(in_layer.weight)
            if i == 0:
                w = fold_input_affine(w, self.start.weight, self.start.bias).to(w)
                in_layer = self.in_layers[0] = nn.Conv1d(
                    w.shape[1], w.shape[0], w.shape[2], dilation=in_layer.dilation,
                    padding=in_layer.padding, bias=False).to(w)
            # Tap-major storage makes each tap's [O, I] slice contiguous.
            in_layer.weight = nn.Parameter(w.permute(2, 0, 1).contiguous().permute(1, 2, 0))
        self.cond_layer.bias.copy_(cond_bias)

        end_w = self.end.weight.double()[:, :, 0]  # [2 n_in, C]
        end_b = self.end.bias.double()
        total_skip_bias = end_b.clone()
        for i, layer in enumerate(self.res_skip_layers):
            w, b = layer.weight.double()[:, :, 0], layer.bias.double()
            n_res = self.n_channels if i < self.n_layers - 1 else 0
            skip_w = end_w @ w[n_res:]
            total_skip_bias += end_w @ b[n_res:]
            new_w = -torch.cat([w[:n_res], skip_w])
            new_b = torch.cat([b[:n_res], torch.zeros_like(skip_w[:, 0])])
            merged = nn.Conv1d(new_w.shape[1], new_w.shape[0], 1).to(layer.weight)
            merged.weight.copy_(new_w.unsqueeze(-1))
            merged.bias.copy_(new_b)
            self.res_skip_layers[i] = merged
        last = self.res_skip_layers[-1]
        last.bias[-end_w.shape[0]:] += total_skip_bias.to(last.bias)
        self.end = nn.Identity()
