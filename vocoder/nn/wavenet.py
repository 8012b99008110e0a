"""WaveNet building blocks shared by the MAF teacher and the IAF student.

Shapes: ``B`` batch, ``C`` channels, ``T`` time steps (audio samples), ``F`` mel frames.

A :class:`WaveNetStack` runs two ways:

* **parallel**: ``forward(x [B, C_in, T], cond [B, C_cond, T]) -> [B, C_out, T]``, for training
  and for scoring audio in one pass;
* **incremental**: ``reset_state(batch)``, then ``step`` once per time step. Every dilated
  convolution keeps only the last ``(kernel_size - 1) * dilation + 1`` of its inputs (the Fast
  WaveNet idea), so a step costs the same whatever the receptive field.

The incremental path reads the weights once, at ``reset_state``, into matrices laid out for
``torch.addmm`` and then writes every intermediate into preallocated buffers: it is the hot
loop of teacher sampling. Gradients do not flow through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

SQRT_HALF = math.sqrt(0.5)


def remove_weight_norm(module: nn.Module) -> None:
    """Bake every weight-norm parametrisation below ``module`` into a plain weight (in place).

    Outputs stay the same; afterwards no weight is recomputed per call. Idempotent.
    """
    for sub in module.modules():
        if parametrize.is_parametrized(sub, "weight"):
            parametrize.remove_parametrizations(sub, "weight", leave_parametrized=True)


class TapBuffer:
    """Input history of one dilated causal convolution, for step-by-step use.

    A step at time ``t`` needs the ``k`` taps ``t - (k-1)d, ..., t - d, t``. They are stored by
    residue ``t mod d``, and each residue keeps a doubled ring of ``k`` slots (every write goes
    to slot ``j`` and ``j + k``), so the ``k`` newest entries of a residue are adjacent in
    memory: the taps are always one contiguous ``[B, k * C]`` view, oldest first, matching
    :meth:`CausalConv1d.flat_weight`. Memory is ``2 * k * d`` vectors; a step touches ``O(k)``
    of them whatever ``d`` is. All views are built here, once.

    The buffer starts as zeros, which is exactly the zero padding of the parallel forward.
    """

    def __init__(self, batch: int, channels: int, kernel_size: int, dilation: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        k, d = kernel_size, dilation
        self.buffer = torch.zeros(batch, d, 2 * k, channels, device=device, dtype=dtype)
        self._phases = []
        for phase in range(d * k):
            residue, slot = phase % d, (phase // d) % k
            self._phases.append((
                self.buffer[:, residue, slot],
                self.buffer[:, residue, slot + k],
                self.buffer[:, residue, slot + 1:slot + k + 1].view(batch, k * channels),
            ))
        self.period = d * k
        self._t = 0

    def reset(self) -> None:
        """Zero the history and go back to time 0 (the views stay valid)."""
        self.buffer.zero_()
        self._t = 0

    def advance(self) -> tuple[Tensor, Tensor, Tensor]:
        """Move to the next time step; returns ``(slot, mirror, taps)``.

        The caller writes the new input ``[B, C]`` into ``slot`` and copies it into ``mirror``;
        ``taps [B, k * C]`` then holds this step's taps.
        """
        views = self._phases[self._t % self.period]
        self._t += 1
        return views

    def push(self, x: Tensor) -> Tensor:
        """Store input ``x [B, C]`` for the next time step and return its taps ``[B, k * C]``."""
        slot, mirror, taps = self.advance()
        slot.copy_(x)
        mirror.copy_(x)
        return taps


class CausalConv1d(nn.Module):
    """Dilated causal convolution: ``[B, C_in, T] -> [B, C_out, T]``, output ``t`` depending
    on inputs ``t - (k-1) * dilation ... t`` only (left zero padding).

    ``reset_state(batch)`` then ``step(x_t [B, C_in, 1]) -> [B, C_out, 1]`` runs it one step
    at a time with the same result as the parallel forward; the weights are read at
    ``reset_state``.
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
        self._taps: TapBuffer | None = None
        self._step_weight: Tensor | None = None
        self._step_bias: Tensor | None = None

    @property
    def receptive_field(self) -> int:
        return self.left_padding + 1

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (self.left_padding, 0)))

    def flat_weight(self) -> Tensor:
        """The kernel as one matrix ``[k * C_in, C_out]`` for taps laid out oldest first
        (``[B, k, C_in]`` flattened), so a step is ``taps @ flat_weight + bias``."""
        return self.conv.weight.permute(2, 1, 0).reshape(-1, self.out_channels)

    def reset_state(self, batch: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Start incremental use at time 0 (empty history) for ``batch`` sequences."""
        weight = self.conv.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        with torch.no_grad():
            self._step_weight = self.flat_weight().to(device, dtype).contiguous()
            bias = self.conv.bias
            self._step_bias = None if bias is None else bias.detach().to(device, dtype)
        self._taps = TapBuffer(batch, self.in_channels, self.kernel_size, self.dilation,
                               device, dtype)

    def clear_state(self) -> None:
        self._taps = self._step_weight = self._step_bias = None

    def step(self, x_t: Tensor) -> Tensor:
        """``x_t [B, C_in, 1]`` (the input at the next time step) -> ``[B, C_out, 1]``."""
        if self._taps is None:
            raise RuntimeError("call reset_state(batch) before step()")
        taps = self._taps.push(x_t[:, :, 0])
        if self._step_bias is None:
            return (taps @ self._step_weight).unsqueeze(-1)
        return torch.addmm(self._step_bias, taps, self._step_weight).unsqueeze(-1)


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

    def _finish(self, h: Tensor, gate: Tensor, cond: Tensor | None) -> tuple[Tensor | None, Tensor]:
        if cond is not None:
            gate = gate + cond
        filt, gate_half = gate.chunk(2, dim=1)
        out = self.out(torch.tanh(filt) * torch.sigmoid(gate_half))
        if not self.has_residual:
            return None, out
        residual, skip = out.split([self.residual_channels, self.skip_channels], dim=1)
        return (h + residual) * SQRT_HALF, skip

    def forward(self, h: Tensor, cond: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        return self._finish(h, self.conv(h), cond)

    def reset_state(self, batch: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> None:
        self.conv.reset_state(batch, device, dtype)

    def clear_state(self) -> None:
        self.conv.clear_state()

    def step(self, h_t: Tensor, cond_t: Tensor | None = None) -> tuple[Tensor | None, Tensor]:
        """``h_t [B, R, 1]``, ``cond_t [B, G, 1]`` -> ``(h_next [B, R, 1], skip [B, S, 1])``."""
        return self._finish(h_t, self.conv.step(h_t), cond_t)


class WaveNetStack(nn.Module):
    """Input 1x1 -> ``n_layers`` gated residual blocks (dilation ``2 ** (i % cycle_length)``)
    -> skip sum scaled by ``sqrt(1 / n_layers)`` -> ReLU, 1x1, ReLU, 1x1.

    ``forward(x [B, C_in, T], cond [B, C_cond, T]) -> [B, C_out, T]``; output ``t`` depends on
    ``x[..., t - receptive_field + 1 : t + 1]`` and on ``cond`` at ``t`` only. The conditioning
    enters every layer through its slice of one bias-free 1x1 (``C_cond -> n_layers * G``); with
    ``cond_channels=0`` the stack is unconditional and takes ``cond=None``.

    ``zero_init_output`` zeroes the last 1x1 so the stack starts by emitting zeros (flows then
    start at the identity). ``weight_norm`` weight-normalises every convolution except that
    zeroed one (a zero weight has no direction); :meth:`remove_weight_norm` bakes it away.
    """

    def __init__(self, in_channels: int, out_channels: int, n_layers: int, cycle_length: int,
                 residual_channels: int, gate_channels: int, skip_channels: int,
                 kernel_size: int = 3, cond_channels: int = 0, weight_norm: bool = False,
                 zero_init_output: bool = False):
        super().__init__()
        if n_layers < 1 or cycle_length < 1:
            raise ValueError("n_layers and cycle_length must be positive")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_layers = n_layers
        self.cond_channels = cond_channels
        self.gate_channels = gate_channels
        self.input = nn.Conv1d(in_channels, residual_channels, 1)
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
            normed = [self.input, self.head[1]] + ([self.cond] if self.cond is not None else [])
            for block in self.blocks:
                normed += [block.conv.conv, block.out]
            if not zero_init_output:
                normed.append(self.head[-1])
            for module in normed:
                parametrizations.weight_norm(module)
        self._stepper: IncrementalStack | None = None

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
        cond_weights = (self.cond.weight.split(self.gate_channels) if cond is not None
                        else [None] * self.n_layers)
        skips = None
        for block, weight in zip(self.blocks, cond_weights, strict=True):
            h, skip = block(h, None if weight is None else F.conv1d(cond, weight))
            skips = skip if skips is None else skips + skip
        return self.head(skips * math.sqrt(1.0 / self.n_layers))

    def remove_weight_norm(self) -> None:
        remove_weight_norm(self)

    def reset_state(self, batch: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> IncrementalStack:
        """Start incremental use at time 0 for ``batch`` sequences; returns the stepper (whose
        ``step`` is the allocation-free hot path) and keeps it for :meth:`step`."""
        self._stepper = IncrementalStack(self, batch, device, dtype)
        return self._stepper

    def clear_state(self) -> None:
        self._stepper = None

    def step(self, x_t: Tensor, cond_t: Tensor | None = None) -> Tensor:
        """``x_t [B, C_in, 1]``, ``cond_t [B, C_cond, 1]`` -> ``[B, C_out, 1]`` (a new tensor)."""
        if self._stepper is None:
            raise RuntimeError("call reset_state(batch) before step()")
        self._check_cond(cond_t)
        stepper = self._stepper
        terms = None if cond_t is None else stepper.conditioning_terms(cond_t)[0]
        return stepper.step(x_t[:, :, 0], terms).clone().unsqueeze(-1)


class IncrementalStack:
    """A :class:`WaveNetStack` baked for step-by-step inference.

    Built by :meth:`WaveNetStack.reset_state`. The weights are copied once into ``addmm``
    layouts and every intermediate has a preallocated buffer, so a step allocates nothing and
    runs five small kernels per layer:

    * the gate is computed with one sigmoid: ``tanh(a) = 2 * sigmoid(2a) - 1``, so with the
      filter half of the gate weights doubled, ``sigmoid(b) - 2 * sigmoid(2a) * sigmoid(b)``
      (one ``addcmul``) is ``-tanh(a) * sigmoid(b)``; the sign goes into the 1x1s after it;
    * each layer's gated output sits in one buffer beside a constant 1, so the 1x1 biases are
      rows of their matrices: the residual update ``sqrt(0.5) * (h + W g + b)`` is one
      ``addmm``, and all layers' skip 1x1s (and the ``sqrt(1 / n_layers)`` scale) are one
      matrix product per step.
    """

    def __init__(self, stack: WaveNetStack, batch: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        ref = stack.input.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        n_layers, gate = stack.n_layers, stack.gate_channels
        half = gate // 2
        self.n_layers, self.gate_channels = n_layers, gate

        def baked(t: Tensor) -> Tensor:
            return t.detach().to(device, dtype).contiguous()

        def with_bias(conv: nn.Conv1d, rows: slice, scale: float) -> Tensor:
            # A 1x1 conv as [C_in + 1, C_out] for [g, 1] @ W, negated to undo the gate's sign.
            weight = torch.cat([conv.weight[rows, :, 0].t(), -conv.bias[rows][None]])
            return baked(weight * -scale)

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        with torch.no_grad():
            # Doubles the filter half of every layer's gate inputs (see the class docstring).
            gate_scale = torch.ones(gate, device=ref.device, dtype=ref.dtype)
            gate_scale[:half] = 2.0
            self.input_weight = baked(stack.input.weight[:, :, 0].t())
            self.input_bias = baked(stack.input.bias)
            self.conv_bias = baked(torch.cat([b.conv.conv.bias * gate_scale
                                              for b in stack.blocks]))
            self.cond_weight = (None if stack.cond is None else baked(
                stack.cond.weight[:, :, 0].t() * gate_scale.repeat(n_layers)))
            # [B, n_layers, G/2 + 1]: each layer's gated output, then a constant 1.
            self.gated = zeros(batch, n_layers, half + 1)
            self.gated[:, :, half] = 1.0
            self.taps = [TapBuffer(batch, b.conv.in_channels, b.conv.kernel_size,
                                   b.conv.dilation, device, dtype) for b in stack.blocks]
            skip_scale = math.sqrt(1.0 / n_layers)
            skip_weights = []
            self.layers = []
            for i, block in enumerate(stack.blocks):
                n_res = block.residual_channels if block.has_residual else 0
                skip_weights.append(with_bias(block.out, slice(n_res, None), skip_scale))
                self.layers.append((
                    baked(block.conv.flat_weight() * gate_scale),
                    self.gated[:, i, :half],
                    self.gated[:, i],
                    with_bias(block.out, slice(0, n_res), SQRT_HALF) if n_res else None,
                    self.taps[i + 1] if n_res else None,
                ))
            self.skip_weight = torch.cat(skip_weights)
            self.hidden_weight = baked(stack.head[1].weight[:, :, 0].t())
            self.hidden_bias = baked(stack.head[1].bias)
            self.output_weight = baked(stack.head[3].weight[:, :, 0].t())
            self.output_bias = baked(stack.head[3].bias)
        self.layer_biases = self.conv_bias.view(n_layers, 1, gate)
        self.gated_all = self.gated.view(batch, -1)
        self.gate = zeros(batch, gate)
        self.filter_half, self.gate_half = self.gate[:, :half], self.gate[:, half:]
        self.skip = zeros(batch, self.skip_weight.shape[1])
        self.hidden = torch.zeros_like(self.skip)
        self.output = zeros(batch, stack.out_channels)

    @property
    def period(self) -> int:
        """Steps after which every tap buffer is back at the same phase (the least common
        multiple of their ``kernel_size * dilation``): runs of this many steps from time 0
        touch the same buffers in the same order, which a CUDA graph needs."""
        return math.lcm(*(taps.period for taps in self.taps))

    def reset(self) -> None:
        """Back to time 0 with an all-zero history, keeping every buffer's address."""
        for taps in self.taps:
            taps.reset()

    def conditioning_terms(self, cond: Tensor, out: Tensor | None = None) -> Tensor:
        """Per-layer gate inputs from conditioning: ``cond [B, C_cond, T]`` ->
        ``[T, n_layers, B, G]`` (each layer's 1x1 projection plus its conv bias, in the
        stepper's internal scaling), written into ``out`` when given.

        Computed ahead for a run of steps in one matrix product; item ``t`` is ``terms`` for
        :meth:`step`.
        """
        if self.cond_weight is None:
            raise ValueError("an unconditional stack has no conditioning terms")
        batch, _, length = cond.shape
        proj = torch.addmm(self.conv_bias, cond.permute(2, 0, 1).reshape(length * batch, -1),
                           self.cond_weight)
        terms = proj.view(length, batch, self.n_layers, self.gate_channels).transpose(1, 2)
        return terms.contiguous() if out is None else out.copy_(terms)

    def step(self, x_t: Tensor, terms: Tensor | None = None) -> Tensor:
        """One time step: ``x_t [B, C_in]`` and ``terms [n_layers, B, G]`` (an item of
        :meth:`conditioning_terms`; ``None`` for an unconditional stack) -> ``[B, C_out]``.

        The result is a buffer that the next step overwrites.
        """
        slot, mirror, taps = self.taps[0].advance()
        torch.addmm(self.input_bias, x_t, self.input_weight, out=slot)
        mirror.copy_(slot)
        gate, filter_half, gate_half = self.gate, self.filter_half, self.gate_half
        for term, (conv_weight, gated, gated_one, residual_weight, next_taps) in zip(
                self.layer_biases if terms is None else terms, self.layers, strict=True):
            torch.addmm(term, taps, conv_weight, out=gate)
            gate.sigmoid_()
            torch.addcmul(gate_half, filter_half, gate_half, value=-2.0, out=gated)
            if next_taps is not None:
                next_slot, mirror, taps = next_taps.advance()
                torch.addmm(slot, gated_one, residual_weight, beta=SQRT_HALF, out=next_slot)
                mirror.copy_(next_slot)
                slot = next_slot
        torch.mm(self.gated_all, self.skip_weight, out=self.skip)
        self.skip.relu_()
        torch.addmm(self.hidden_bias, self.skip, self.hidden_weight, out=self.hidden)
        self.hidden.relu_()
        return torch.addmm(self.output_bias, self.hidden, self.output_weight, out=self.output)


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

    def forward(self, mel: Tensor) -> Tensor:
        c = self.frame_conv(mel).unsqueeze(1)  # [B, 1, C, F]: 2-D so one kernel serves all C
        for s, smoother in zip(self.scales, self.smoothers, strict=True):
            c = smoother(c.repeat_interleave(s, dim=-1))
        return c.squeeze(1)
