"""Parallel inference of causal WaveNets conditioned on mels (the student's flows).

:class:`ParallelStack` runs a :class:`~vocoder.nn.baking.BakedWaveNet` over every time step
of a batch at once, time-major, as matrix products; :class:`ParallelWork` holds the buffers
and the mel conditioning that several stacks of one synthesis share.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from vocoder.nn.baking import SQRT_HALF, BakedWaveNet, gate_

CPU_BLOCK_ROWS = 4096
"""Rows per block of :class:`ParallelWork` on CPU."""


class ParallelStack:
    """A baked WaveNet of one signal input (a flow's network) run over all ``B * T`` positions.

    Input channel 0 is the signal shifted by one; the further ones, if any, are the excitation
    source given to :class:`ParallelWork`, read at the current step.

    * activations live in ``[B, P + T, C]`` buffers (flattened to rows) whose first ``P`` rows
      per sequence are zeros, ``P`` at least the largest causal padding, so the input of a
      dilated tap ``s`` steps back is a row range of one contiguous matrix: a causal
      convolution is one ``addmm`` per kernel tap into the gate, with no padding copies;
    * the first layer's taps read the columns ``(x, s, 1)`` (the baked fold of the input 1x1;
      ``s`` the source, if any), ``(2 + K) / C`` of the arithmetic of the taps that dominate a
      layer;
    * the mel conditioning never exists at the sample rate: each layer's 1x1 projection is
      applied to the frames and then upsampled by the upsampler's banded polyphase matrix
      (:meth:`~vocoder.nn.wavenet.MelUpsampler.polyphase`), one ``baddbmm`` with ``2J + 1``
      (about 5) multiply-adds per gate value instead of ``cond_channels``;
    * the residual update ``sqrt(1/2) h + [-g, 1] residual`` is one in-place ``addmm_`` on the
      one activation buffer (causality lets the row blocks run last to first, each still
      reading the layer's input), and the skip sum accumulates in place.
    """

    def __init__(self, baked: BakedWaveNet):
        if baked.cond_weight is None:
            raise ValueError("ParallelStack runs conditioned stacks")
        self.baked = baked
        self.half = baked.gate_channels // 2

    @property
    def padding(self) -> int:
        return self.baked.padding

    def initial_state(self, batch: int) -> StackState:
        """The streaming state at the start of a signal (all history zero)."""
        ref = self.baked.input_weight
        shifts = [max(shift for shift, _ in layer.taps) for layer in self.baked.layers]
        # The first layer reads `inputs`: its entry in `layers` holds nothing.
        return StackState(ref.new_zeros(batch, 1),
                          ref.new_zeros(batch, shifts[0], ref.shape[0] + 1),
                          [ref.new_zeros(batch, 0 if i == 0 else p, self.baked.residual_channels)
                           for i, p in enumerate(shifts)])

    def __call__(self, h: Tensor, work: ParallelWork, state: StackState | None = None
                 ) -> Tensor:
        """``h [B, T]`` (the input, not yet shifted) -> ``[B, T, C_out]``: the stack's output
        at ``t`` from ``h[:, :t]`` (the input shifted right by one, zero first). Inference
        only (no autograd); the result is a view of a buffer of ``work``.

        With ``state`` (:meth:`initial_state`) the call is the next piece of a longer signal:
        the padding rows of every layer hold that layer's last inputs instead of zeros, and
        ``state`` is updated to end with this piece, so pieces give the whole signal's output.
        """
        baked = self.baked
        batch, length = h.shape
        pad, gate_channels, hop = work.padding, baked.gate_channels, work.hop
        rows, skip = work.h, work.skip
        # Every layer's projection of every frame: [frame rows, n_layers * G].
        projected = torch.mm(work.frames, baked.cond_weight)
        row = projected.stride(0)
        start = projected.storage_offset() + work.first_window * row
        if state is None:
            shifted = F.pad(h, (1, -1))
        else:
            shifted = torch.cat([state.last, h[:, :-1]], dim=1)
            state.last = h[:, -1:].clone()
        data_rows = rows.view(batch, pad + length, -1)[:, pad:]
        torch.addcmul(baked.input_bias, shifted.unsqueeze(-1), baked.input_weight[0],
                      out=data_rows)
        n_inputs = baked.input_weight.shape[0]
        if n_inputs != work.inputs.shape[-1] - 1:
            raise ValueError(f"a stack of {n_inputs} input channels needs a work with "
                             f"{n_inputs - 1} source channels")
        inputs = work.inputs.view(batch, pad + length, n_inputs + 1)
        inputs[:, pad:, 0] = shifted
        if n_inputs > 1:
            data_rows.add_(torch.matmul(inputs[:, pad:, 1:-1], baked.input_weight[1:]))
        if state is not None:
            kept = state.inputs.shape[1]
            inputs[:, pad - kept:pad] = state.inputs
            state.inputs = _last(state.inputs, inputs[:, pad:], kept)
        for i, layer in enumerate(baked.layers):
            tap_rows = work.inputs if i == 0 else rows
            if state is not None and i > 0:
                view = rows.view(batch, pad + length, -1)
                kept = state.layers[i].shape[1]
                view[:, pad - kept:pad] = state.layers[i]
                state.layers[i] = _last(state.layers[i], view[:, pad:], kept)
            # Row blocks of whole hops: every op below is local to its rows once the layer's
            # input exists, so the gate of one block stays in cache from matmul to 1x1s. The
            # blocks run last to first, so the residual update can be in place: a block's taps
            # read only its own and earlier rows, which are still the layer's input.
            for first, last in reversed(work.blocks):
                r0, r1 = first * hop, last * hop
                gate = work.gate[:r1 - r0]
                windows = projected.as_strided((last - first, work.window, gate_channels),
                                               (row, row, 1),
                                               start + first * row + i * gate_channels)
                torch.baddbmm(layer.gate_bias, work.polyphase[first:last], windows,
                              out=gate.view(last - first, hop, gate_channels))
                for shift, weight in layer.taps:
                    gate.addmm_(tap_rows[pad - shift + r0:pad - shift + r1], weight)
                gated = work.gated[:r1 - r0]
                gate_(gate, out=gated[:, :self.half])
                if i == 0:
                    torch.mm(gated, layer.skip, out=skip[r0:r1])
                else:
                    skip[r0:r1].addmm_(gated, layer.skip)
                if layer.residual is not None:
                    rows[pad + r0:pad + r1].addmm_(gated, layer.residual, beta=SQRT_HALF)
            if layer.residual is not None:
                # Rows between sequences hold junk now; they are the next sequence's padding.
                rows.view(batch, pad + length, -1)[1:, :pad].zero_()
        skip.relu_()
        for first, last in work.blocks:
            r0, r1 = first * hop, last * hop
            hidden = torch.addmm(baked.hidden_bias, skip[r0:r1], baked.hidden_weight,
                                 out=work.hidden[:r1 - r0])
            hidden.relu_()
            torch.addmm(baked.output_bias, hidden, baked.output_weight,
                        out=work.out[pad + r0:pad + r1])
        return work.out.view(batch, pad + length, -1)[:, pad:]


@dataclasses.dataclass
class StackState:
    """What a :class:`ParallelStack` keeps between pieces of one signal: ``last [B, 1]`` the
    previous piece's last input sample, ``inputs [B, P_0, K + 2]`` the first layer's last rows
    ``(x, s, 1)`` of shifted input and source (zeros before the signal: the zero padding of
    the first layer's input), and ``layers[i] [B, P_i, R]`` the last ``P_i`` inputs of layer ``i``
    (its longest tap; ``layers[0]`` is empty: the first layer reads ``inputs``)."""

    last: Tensor
    inputs: Tensor
    layers: list[Tensor]


def _last(history: Tensor, new: Tensor, kept: int) -> Tensor:
    """The last ``kept`` steps (dim 1) of ``history`` followed by ``new``, as a new tensor."""
    if new.shape[1] >= kept:
        return new[:, new.shape[1] - kept:].clone()
    return torch.cat([history, new], dim=1)[:, -kept:].clone()


class ParallelWork:
    """Buffers and conditioning shared by the :class:`ParallelStack` passes of one synthesis.

    Sequences are laid out as blocks of ``hop`` rows: ``pad_frames`` zero blocks, then the
    ``F`` data blocks, repeated per sequence; the stacks compute every row from the first data
    row on (the gaps between sequences are junk and ignored). ``frames`` holds the mel
    features after the upsampler's first convolution, one row per block (zero rows in the
    gaps, ``J`` more at the end) and ``polyphase [blocks, hop, 2J + 1]`` the upsampling
    weights of each computed block (zero for the gaps).

    ``emit=(a, b)`` (streaming) computes only frames ``a .. b - 1`` of ``mel``; the others are
    context: the frames the polyphase windows of ``a .. b - 1`` read are copied beside them.
    ``source [B, K, (b - a) * hop]`` is the excitation of the computed samples for stacks with
    ``1 + K`` input channels (see :mod:`vocoder.nn.excitation`).

    Each layer runs over ``blocks``, ranges of whole hops of about :data:`CPU_BLOCK_ROWS`
    rows on CPU (all rows in one range elsewhere, or when it is ``None``), with the gate and
    the head's hidden layer in buffers of one range. On CPU ranges of a few thousand rows
    keep a layer's intermediates in cache (about 20% faster for the ``paper`` student than
    whole sequences); on a GPU one range for all rows launches the fewest kernels.
    """

    def __init__(self, upsampler, stacks: list[ParallelStack], mel: Tensor,
                 emit: tuple[int, int] | None = None, source: Tensor | None = None):
        baked = stacks[0].baked
        device, dtype = baked.input_weight.device, baked.input_weight.dtype
        block_rows = CPU_BLOCK_ROWS if device.type == "cpu" else None
        batch, _, window_frames = mel.shape
        hop = self.hop = upsampler.hop_length
        # `emit` (streaming): compute only frames [a, b) of `mel`, the rest being context.
        a, b = (0, window_frames) if emit is None else emit
        frames = b - a
        polyphase, reach = upsampler.polyphase(window_frames, device, dtype)
        polyphase = polyphase[a:b]
        pad_frames = max(reach, -(-max(stack.padding for stack in stacks) // hop))
        if emit is not None:
            # Room for one sequence's right context and the next one's left context.
            pad_frames = max(pad_frames, 2 * reach)
        stride = pad_frames + frames
        self.padding = pad_frames * hop
        self.window = 2 * reach + 1
        window_starts = batch * stride - pad_frames
        self.first_window = pad_frames - reach
        step = window_starts if block_rows is None else max(1, block_rows // hop)
        self.blocks = [(first, min(first + step, window_starts))
                       for first in range(0, window_starts, step)]
        with torch.no_grad():
            features = upsampler.project_frames(mel).transpose(1, 2)
        self.frames = features.new_zeros(batch * stride + reach, features.shape[-1])
        # Each sequence's computed frames, with the context its polyphase windows read.
        before, after = min(reach, a), min(reach, window_frames - b)
        for i in range(batch):
            first = i * stride + pad_frames
            self.frames[first - before:first + frames + after] = features[i, a - before:
                                                                          b + after]
        blocks = polyphase.new_zeros(batch, stride, hop, self.window)
        blocks[:, pad_frames:] = polyphase
        self.polyphase = blocks.view(batch * stride, hop, -1)[pad_frames:]
        rows = batch * stride * hop
        computed = rows - self.padding
        block = min(step * hop, computed)
        gate, skip = baked.gate_channels, baked.skip_channels
        self.h = torch.zeros(rows, baked.residual_channels, device=device, dtype=dtype)
        self.gate = torch.empty(block, gate, device=device, dtype=dtype)
        self.gated = torch.empty(block, gate // 2 + 1, device=device, dtype=dtype)
        self.gated[:, -1] = 1.0
        self.skip = torch.empty(computed, skip, device=device, dtype=dtype)
        # The head's hidden layer runs after the last gate: it may reuse the gate's memory.
        self.hidden = (self.gate.view(-1)[:block * skip].view(block, skip) if gate >= skip
                       else torch.empty(block, skip, device=device, dtype=dtype))
        self.out = torch.empty(rows, baked.out_channels, device=device, dtype=dtype)
        # (x, s, 1) per data row of a stack's shifted input and excitation, zeros in the
        # padding rows: the first layer's taps read it (see ParallelStack).
        n_source = 0 if source is None else source.shape[1]
        if source is not None and tuple(source.shape) != (batch, n_source, frames * hop):
            raise ValueError(f"source must be [{batch}, K, {frames * hop}], got "
                             f"{tuple(source.shape)}")
        inputs = torch.zeros(batch, stride * hop, n_source + 2, device=device, dtype=dtype)
        inputs[:, self.padding:, -1] = 1.0
        if source is not None:
            inputs[:, self.padding:, 1:-1] = source.transpose(1, 2)
        self.inputs = inputs.view(rows, n_source + 2)
