"""WaveNet building blocks shared by the MAF teacher and the IAF student.

Shapes: ``B`` batch, ``C`` channels, ``T`` time steps (audio samples), ``F`` mel frames.

These are the training forms (autograd, parallel over time). Their inference forms are built
from them by one baking step (:mod:`vocoder.nn.baking`): step by step
(:mod:`vocoder.nn.incremental`, teacher sampling) and parallel (:mod:`vocoder.nn.parallel`,
student synthesis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vocoder.nn.baking import SQRT_HALF
from vocoder.nn.weight_norm import (
    WeightNormConv1d,
    conv_weight,
    migrate_parametrized_keys,
    remove_weight_norm,
)


class CausalConv1d(nn.Module):
    """Dilated causal convolution: ``[B, C_in, T] -> [B, C_out, T]``, output ``t`` depending
    on inputs ``t - (k-1) * dilation ... t`` only (left zero padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 dilation: int = 1, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation,
                              bias=bias)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.dilation = dilation
        self.left_padding = (kernel_size - 1) * dilation

    @property
    def receptive_field(self) -> int:
        return self.left_padding + 1

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.left_padding, 0)))


class ResidualBlock(nn.Module):
    """One gated WaveNet layer.

    ``h [B, R, T]`` -> dilated causal conv to ``G`` gate channels, plus the conditioning
    ``cond [B, G, T]`` (already projected to gate channels by the caller, or ``None``) ->
    ``tanh(first half) * sigmoid(second half)`` ``[B, G/2, T]`` -> one fused 1x1 to the
    residual (``R``) and skip (``S``) channels. Returns ``(h_next, skip)`` with
    ``h_next = (h + residual) * sqrt(0.5)`` ``[B, R, T]`` and ``skip [B, S, T]``. A block built
    with ``has_residual=False`` (the last of a stack, whose residual nobody reads) returns
    ``(None, skip)``.
    """

    def __init__(self, residual_channels: int, gate_channels: int, skip_channels: int,
                 kernel_size: int, dilation: int, has_residual: bool = True):
        super().__init__()
        if gate_channels % 2:
            raise ValueError(f"gate_channels must be even, got {gate_channels}")
        self.residual_channels = residual_channels
        self.gate_channels = gate_channels
        self.skip_channels = skip_channels
        self.has_residual = has_residual
        self.conv = CausalConv1d(residual_channels, gate_channels, kernel_size, dilation)
        out_channels = skip_channels + (residual_channels if has_residual else 0)
        self.out = nn.Conv1d(gate_channels // 2, out_channels, 1)

    def forward(self, h: Tensor, cond: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        gate = self.conv(h)
        if cond is not None:
            gate = gate + cond
        filt, gate_half = gate.chunk(2, dim=1)
        out = self.out(torch.tanh(filt) * torch.sigmoid(gate_half))
        if not self.has_residual:
            return None, out
        residual, skip = out.split([self.residual_channels, self.skip_channels], dim=1)
        return (h + residual) * SQRT_HALF, skip


class WaveNetStack(nn.Module):
    """Input 1x1 -> ``n_layers`` gated residual blocks (dilation ``2 ** (i % cycle_length)``)
    -> skip sum scaled by ``sqrt(1 / n_layers)`` -> ReLU, 1x1, ReLU, 1x1.

    ``forward(x [B, C_in, T], cond [B, C_cond, T]) -> [B, C_out, T]``; output ``t`` depends on
    ``x[..., t - receptive_field + 1 : t + 1]`` and on ``cond`` at ``t`` only. The conditioning
    enters every layer through its slice of one bias-free 1x1 (``C_cond -> n_layers * G``); with
    ``cond_channels=0`` the stack is unconditional and takes ``cond=None``.

    ``zero_init_output`` zeroes the last 1x1 so the stack starts by emitting zeros (flows then
    start at the identity). ``input_init_gains`` (one factor per input channel) scales the
    first 1x1's initial weights, so a stack with many conditioning inputs beside its signal can
    start with the signal's share of its first layer where a narrower one has it.
    ``weight_norm`` weight-normalises every convolution except that zeroed one (a zero weight
    has no direction); :meth:`remove_weight_norm` bakes it away.
    """

    def __init__(self, in_channels: int, out_channels: int, n_layers: int, cycle_length: int,
                 residual_channels: int, gate_channels: int, skip_channels: int,
                 kernel_size: int = 3, cond_channels: int = 0, weight_norm: bool = False,
                 zero_init_output: bool = False, input_init_gains: list[float] | None = None):
        super().__init__()
        if n_layers < 1 or cycle_length < 1:
            raise ValueError("n_layers and cycle_length must be positive")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_layers = n_layers
        self.cond_channels = cond_channels
        self.gate_channels = gate_channels
        self.input = nn.Conv1d(in_channels, residual_channels, 1)
        if input_init_gains is not None:
            if len(input_init_gains) != in_channels:
                raise ValueError(f"input_init_gains needs {in_channels} factors, got "
                                 f"{len(input_init_gains)}")
            with torch.no_grad():
                self.input.weight.mul_(torch.tensor(input_init_gains).view(1, -1, 1))
        self.cond = (nn.Conv1d(cond_channels, n_layers * gate_channels, 1, bias=False)
                     if cond_channels else None)
        self.blocks = nn.ModuleList(
            ResidualBlock(residual_channels, gate_channels, skip_channels, kernel_size,
                          dilation=2 ** (i % cycle_length), has_residual=i < n_layers - 1)
            for i in range(n_layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv1d(skip_channels, skip_channels, 1),
            nn.ReLU(), nn.Conv1d(skip_channels, out_channels, 1),
        )
        if zero_init_output:
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
        if weight_norm:
            normed = [(self, "input"), (self.head, "1")]
            normed += [(self, "cond")] if self.cond is not None else []
            for block in self.blocks:
                normed += [(block.conv, "conv"), (block, "out")]
            if not zero_init_output:
                normed.append((self.head, "3"))
            for parent, name in normed:
                setattr(parent, name, WeightNormConv1d.from_conv(getattr(parent, name)))
        self.register_load_state_dict_pre_hook(self._migrate_keys)

    @staticmethod
    def _migrate_keys(module, state_dict, prefix, *args) -> None:
        migrate_parametrized_keys(state_dict, prefix)

    @property
    def receptive_field(self) -> int:
        """Inputs (current one included) that one output sees."""
        return 1 + sum(block.conv.left_padding for block in self.blocks)

    def _check_cond(self, cond: Tensor | None) -> None:
        if (cond is None) != (self.cond is None):
            raise ValueError("cond must be given exactly when the stack has cond_channels > 0")

    def forward(self, x: Tensor, cond: Tensor | None = None) -> Tensor:
        self._check_cond(cond)
        h = self.input(x)
        # One layer's slice of the fused projection at a time: all layers' [B, G, T] at once
        # would be the largest activation of the stack.
        cond_weights = (conv_weight(self.cond).split(self.gate_channels) if cond is not None
                        else [None] * self.n_layers)
        skips = None
        for block, weight in zip(self.blocks, cond_weights, strict=True):
            h, skip = block(h, None if weight is None else F.conv1d(cond, weight))
            skips = skip if skips is None else skips + skip
        return self.head(skips * math.sqrt(1.0 / self.n_layers))

    def remove_weight_norm(self) -> None:
        remove_weight_norm(self)


def default_upsample_scales(hop_length: int) -> list[int]:
    """Factor ``hop_length`` into small stretch factors, pairs of 2 merged into 4:
    256 -> [4, 4, 4, 4], 200 -> [2, 4, 5, 5], 300 -> [3, 4, 5, 5]."""
    if hop_length < 1:
        raise ValueError(f"hop_length must be positive, got {hop_length}")
    primes, n, p = [], hop_length, 2
    while p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    if n > 1:
        primes.append(n)
    twos = primes.count(2)
    scales = [4] * (twos // 2) + [2] * (twos % 2) + [q for q in primes if q != 2]
    return sorted(scales) or [1]


class MelUpsampler(nn.Module):
    """Learned mel-to-sample-rate upsampler: ``mel [B, n_mels, F] -> cond [B, C, F * hop]``.

    A convolution over ``2 * frame_context + 1`` neighbouring frames (``n_mels -> C``), then per
    scale ``s`` of ``upsample_scales`` (whose product is ``hop_length``): a nearest stretch by
    ``s`` and a learned smoothing over ``2s + 1`` samples, shared by all channels and started
    as a box filter. Frame ``i`` is stretched over samples ``[i * hop, (i + 1) * hop)``; the
    smoothing lets it reach a little into its neighbours (mels are given whole, so being
    non-causal here is fine). Edges are padded by replication.
    """

    def __init__(self, n_mels: int, hop_length: int, out_channels: int | None = None,
                 upsample_scales: Sequence[int] | None = None, frame_context: int = 1):
        super().__init__()
        scales = list(upsample_scales) if upsample_scales else default_upsample_scales(hop_length)
        if math.prod(scales) != hop_length or min(scales) < 1:
            raise ValueError(f"upsample_scales {scales} must be positive with product "
                             f"hop_length={hop_length}")
        self.scales = [int(s) for s in scales]
        self.hop_length = hop_length
        self.out_channels = out_channels or n_mels
        self.frame_conv = nn.Conv1d(n_mels, self.out_channels, 2 * frame_context + 1,
                                    padding=frame_context, padding_mode="replicate")
        self.smoothers = nn.ModuleList()
        for s in self.scales:
            smoother = nn.Conv2d(1, 1, (1, 2 * s + 1), padding=(0, s), bias=False,
                                 padding_mode="replicate")
            nn.init.constant_(smoother.weight, 1.0 / (2 * s + 1))
            self.smoothers.append(smoother)

    @property
    def lookahead_frames(self) -> int:
        """Mel frames after its own that a frame's samples read (the first convolution's
        context plus the smoothing's reach): the frames a stream must wait for."""
        weight = self.smoothers[0].weight
        return self.frame_conv.padding[0] + self.polyphase(64, weight.device, weight.dtype)[1]

    def project_frames(self, mel: Tensor) -> Tensor:
        """The first, per-frame convolution: ``mel [B, n_mels, F]`` -> ``[B, C, F]``."""
        return self.frame_conv(mel)

    def stretch(self, frames: Tensor) -> Tensor:
        """The rest of :meth:`forward`: ``[..., F]`` -> ``[..., F * hop]``, every row alike (a
        linear map of the time axis)."""
        # [N, 1, rows, F]: 2-D convolutions with one kernel for every row
        c = frames.reshape(-1, 1, frames.shape[-2] if frames.dim() > 1 else 1, frames.shape[-1])
        for s, smoother in zip(self.scales, self.smoothers, strict=True):
            c = smoother(c.repeat_interleave(s, dim=-1))
        return c.reshape(*frames.shape[:-1], -1)

    def forward(self, mel: Tensor) -> Tensor:
        return self.stretch(self.project_frames(mel))

    @torch.no_grad()
    def polyphase(self, frames: int, device: torch.device | str,
                  dtype: torch.dtype) -> tuple[Tensor, int]:
        """:meth:`stretch` for ``frames`` frames as a banded matrix, in polyphase form.

        :meth:`stretch` is linear in time and treats every channel alike, so it maps frames to
        samples by one matrix ``M [F, F * hop]`` (replicate padding at the edges is linear
        too): stretching the identity gives it. Sample ``i * hop + p`` reads only frames
        ``i - J .. i + J``. Returns ``(A, J)`` with ``A [F, hop, 2J + 1]``,
        ``A[i, p, j] = M[i + j - J, i * hop + p]`` (zero outside the utterance). Any per-frame
        projection ``W`` commutes with it: ``W stretch(c) = stretch(W c)``, so a network can
        project the frames (:meth:`project_frames`) before upsampling them.

        Only frames within ``E`` of either end see the edge padding (``E`` bounds how far the
        smoothing reaches); every frame between has the same weights. So ``M`` is computed for
        ``2E + 1`` frames at most, and the middle frame's weights are repeated.
        """
        hop, rate, reach_samples = self.hop_length, 1, 0.0
        for scale, smoother in zip(self.scales, self.smoothers, strict=True):
            rate *= scale
            reach_samples += (smoother.kernel_size[-1] // 2 + 1) * hop / rate
        edge = math.ceil(reach_samples / hop) + 1
        probe = min(frames, 2 * edge + 1)
        weight = self.smoothers[0].weight
        matrix = self.stretch(torch.eye(probe, device=weight.device, dtype=weight.dtype))
        matrix = matrix.to(device, dtype)
        support = matrix.nonzero()
        reach = int((support[:, 0] - support[:, 1] // hop).abs().max()) if len(support) else 0
        padded = F.pad(matrix, (0, 0, reach, reach))
        bands = torch.stack([padded[j:j + probe].view(probe, probe, hop)
                             .diagonal(dim1=0, dim2=1).t() for j in range(2 * reach + 1)],
                            dim=-1)
        if probe < frames:
            middle = bands[edge:edge + 1].expand(frames - 2 * edge, -1, -1)
            bands = torch.cat([bands[:edge], middle, bands[edge + 1:]])
        return bands, reach
