"""Step-by-step inference of a causal WaveNet (the teacher's sampling loop).

Every dilated convolution keeps only the last ``(kernel_size - 1) * dilation + 1`` of its
inputs (the Fast WaveNet idea), so a step costs the same whatever the receptive field.
:class:`IncrementalStack` runs a :class:`~vocoder.nn.baking.BakedWaveNet` this way through
preallocated buffers: it is the hot loop of teacher sampling. Gradients do not flow through it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vocoder.nn.baking import SQRT_HALF, BakedWaveNet, bound_gate


class TapBuffer:
    """Input history of one dilated causal convolution, for step-by-step use.

    A step at time ``t`` needs the ``k`` taps ``t - (k-1)d, ..., t - d, t``. They are stored by
    residue ``t mod d``, and each residue keeps a doubled ring of ``k`` slots (every write goes
    to slot ``j`` and ``j + k``), so the ``k`` newest entries of a residue are adjacent in
    memory: the taps are always one contiguous ``[B, k * C]`` view, oldest first, matching
    :meth:`~vocoder.nn.baking.BakedLayer.flat_taps`. Memory is ``2 * k * d`` vectors; a step
    touches ``O(k)`` of them whatever ``d`` is. All views are built here, once.

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


def _kernel_and_dilation(taps: list[tuple[int, Tensor]]) -> tuple[int, int]:
    k = len(taps)
    return k, (taps[0][0] // (k - 1) if k > 1 else 1)


class IncrementalStack:
    """A :class:`~vocoder.nn.baking.BakedWaveNet` run one time step at a time for ``batch``
    sequences; a step allocates nothing and runs five small kernels per layer.

    Each layer's sign-flipped gate sits in one buffer beside a constant 1, so the residual
    update ``sqrt(1/2) h + [-g, 1] residual`` is one ``addmm`` and all layers' skip 1x1s are one
    matrix product per step. The stack must be baked with ``fold_first_layer=False``: at a
    handful of rows per step the fold saves less than the extra copies it needs cost.
    """

    def __init__(self, baked: BakedWaveNet, batch: int):
        if baked.first_layer_folded:
            raise ValueError("IncrementalStack needs a stack baked with fold_first_layer=False")
        ref = baked.input_weight
        device, dtype = ref.device, ref.dtype
        n_layers, gate = baked.n_layers, baked.gate_channels
        half = gate // 2
        self.n_layers, self.gate_channels = n_layers, gate
        self.input_weight, self.input_bias = baked.input_weight, baked.input_bias
        self.gate_bias = torch.cat([layer.gate_bias for layer in baked.layers])
        self.cond_weight = baked.cond_weight
        self.hidden_weight, self.hidden_bias = baked.hidden_weight, baked.hidden_bias
        self.output_weight, self.output_bias = baked.output_weight, baked.output_bias

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        # [B, n_layers, G/2 + 1]: each layer's gated output, then a constant 1.
        self.gated = zeros(batch, n_layers, half + 1)
        self.gated[:, :, half] = 1.0
        self.taps = [TapBuffer(batch, baked.residual_channels, *_kernel_and_dilation(layer.taps),
                               device, dtype) for layer in baked.layers]
        self.skip_weight = torch.cat([layer.skip for layer in baked.layers])
        self.gate = zeros(batch, gate)
        self.layers = [(layer.flat_taps(), bound_gate(self.gate, self.gated[:, i, :half]),
                        self.gated[:, i], layer.residual,
                        self.taps[i + 1] if layer.residual is not None else None)
                       for i, layer in enumerate(baked.layers)]
        self.layer_biases = self.gate_bias.view(n_layers, 1, gate)
        self.gated_all = self.gated.view(batch, -1)
        self.skip = zeros(batch, self.skip_weight.shape[1])
        self.hidden = torch.zeros_like(self.skip)
        self.output = zeros(batch, baked.out_channels)

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
        ``[T, n_layers, B, G]`` (each layer's 1x1 projection plus its conv bias, in the baked
        scaling), written into ``out`` when given.

        Computed ahead for a run of steps in one matrix product; item ``t`` is ``terms`` for
        :meth:`step`.
        """
        if self.cond_weight is None:
            raise ValueError("an unconditional stack has no conditioning terms")
        batch, _, length = cond.shape
        proj = torch.addmm(self.gate_bias, cond.permute(2, 0, 1).reshape(length * batch, -1),
                           self.cond_weight)
        terms = proj.view(length, batch, self.n_layers, self.gate_channels).transpose(1, 2)
        return terms.contiguous() if out is None else out.copy_(terms)

    def step(self, x_t: Tensor, terms: Tensor | None = None) -> Tensor:
        """One time step: ``x_t [B, C_in]`` and ``terms [n_layers, B, G]`` (an item of
        :meth:`conditioning_terms`; ``None`` for an unconditional stack) -> ``[B, C_out]``.

        The result is a buffer that the next step overwrites.
        """
        slot, mirror, taps = self.taps[0].advance()
        h = torch.addmm(self.input_bias, x_t, self.input_weight, out=slot)
        mirror.copy_(slot)
        gate = self.gate
        for term, (tap_weight, gated, gated_one, residual_weight, next_taps) in zip(
                self.layer_biases if terms is None else terms, self.layers, strict=True):
            torch.addmm(term, taps, tap_weight, out=gate)
            gated()
            if next_taps is not None:
                next_slot, mirror, taps = next_taps.advance()
                torch.addmm(h, gated_one, residual_weight, beta=SQRT_HALF, out=next_slot)
                mirror.copy_(next_slot)
                h = next_slot
        torch.mm(self.gated_all, self.skip_weight, out=self.skip)
        self.skip.relu_()
        torch.addmm(self.hidden_bias, self.skip, self.hidden_weight, out=self.hidden)
        self.hidden.relu_()
        return torch.addmm(self.output_bias, self.hidden, self.output_weight, out=self.output)
