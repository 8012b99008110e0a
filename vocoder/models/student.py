"""The student: a stack of inverse autoregressive flows (IAF) from noise ``z`` to audio ``x``.

Flow ``k`` reads the previous flow's output ``z^(k-1)`` (``z^0 = z``) shifted right by one
sample, so position ``t`` sees only ``z^(k-1)_<t``::

    z^k_t = z^(k-1)_t * sigma^k_t + mu^k_t,   (mu^k_t, log sigma^k_t) = WaveNet_k(z^(k-1)_<t, c)

Every flow is affine in its input given the past, so the whole chain is one affine map per
step: ``x_t = mu_tot_t + sigma_tot_t * z_t`` with ``log sigma_tot = sum_k log sigma^k`` and
``mu_tot`` composed flow by flow (``mu_tot^k = mu_tot^(k-1) * sigma^k + mu^k``). Both totals
depend on ``z_<t`` only, so given the past ``x_t`` is Gaussian and the student knows the
density of its own samples exactly. Sampling is one parallel pass, with no loop over time.

Training runs the flows as ordinary modules (:meth:`Student.forward`). Synthesis runs them
through :class:`LeanFlow`, the same arithmetic laid out for speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vocoder.errors import VocoderError
from vocoder.models.base import Vocoder
from vocoder.models.teacher import LOG_2PI
from vocoder.nn.wavenet import SQRT_HALF, MelUpsampler, WaveNetStack


def _stretch(upsampler: MelUpsampler, frames: Tensor) -> Tensor:
    """``MelUpsampler.forward`` after its first convolution, on ``[1, 1, C, F]``."""
    for scale, smoother in zip(upsampler.scales, upsampler.smoothers, strict=True):
        frames = smoother(frames.repeat_interleave(scale, dim=-1))
    return frames


def frames_to_samples(upsampler: MelUpsampler, frames: int, device: torch.device,
                      dtype: torch.dtype) -> tuple[Tensor, int]:
    """The upsampler's stretching and smoothing as a banded matrix, in polyphase form.

    After its first convolution :class:`~vocoder.nn.wavenet.MelUpsampler` is linear in time
    and treats every channel alike, so it maps frames to samples by one matrix ``M [F, F * hop]``
    (replicate padding at the edges is linear too): upsampling the identity gives it. Sample
    ``i * hop + p`` reads only frames ``i - J .. i + J``. Returns ``(A, J)`` with
    ``A [F, hop, 2J + 1]``, ``A[i, p, j] = M[i + j - J, i * hop + p]`` (zero outside the
    utterance). Any per-frame projection ``W`` commutes with it: ``W up(c) = up(W c)``.

    Only frames within ``E`` of either end see the edge padding (``E`` bounds how far the
    smoothing reaches); every frame between has the same weights. So ``M`` is computed for
    ``2E + 1`` frames at most, and the middle frame's weights are repeated.
    """
    hop, rate, reach_samples = upsampler.hop_length, 1, 0.0
    for scale, smoother in zip(upsampler.scales, upsampler.smoothers, strict=True):
        rate *= scale
        reach_samples += (smoother.kernel_size[-1] // 2 + 1) * hop / rate
    edge = math.ceil(reach_samples / hop) + 1
    probe = min(frames, 2 * edge + 1)
    matrix = _stretch(upsampler, torch.eye(probe, device=device, dtype=dtype)[None, None])[0, 0]
    support = matrix.nonzero()
    reach = int((support[:, 0] - support[:, 1] // hop).abs().max()) if len(support) else 0
    padded = F.pad(matrix, (0, 0, reach, reach))
    bands = torch.stack([padded[j:j + probe].view(probe, probe, hop).diagonal(dim1=0, dim2=1).t()
                         for j in range(2 * reach + 1)], dim=-1)
    if probe < frames:
        middle = bands[edge:edge + 1].expand(frames - 2 * edge, -1, -1)
        bands = torch.cat([bands[:edge], middle, bands[edge + 1:]])
    return bands, reach


CPU_BLOCK_ROWS = 4096
"""Rows per block of :class:`LeanWork` on CPU."""


class LeanFlow:
    """One flow's WaveNet baked for parallel inference.

    Everything runs time-major, as matrix products over all ``B * T`` positions at once:

    * activations live in ``[B, P + T, C]`` buffers (flattened to rows) whose first ``P`` rows
      per sequence are zeros, ``P`` at least the largest causal padding, so the input of a
      dilated tap ``s`` steps back is a row range of one contiguous matrix: a causal
      convolution is one ``addmm`` per kernel tap into the gate, with no padding copies;
    * the first layer's input is the flow's input ``x`` through a 1x1 from one channel,
      ``x w + b`` per row, so its taps multiply the two columns ``(x, 1)`` by ``[w; b] W``
      (``[2, G]``) instead of ``C`` channels by ``W`` (``[C, G]``): ``2 / C`` of the
      arithmetic of the taps that dominate a layer;
    * the mel conditioning never exists at the sample rate: each layer's 1x1 projection is
      applied to the frames and then upsampled by the banded polyphase matrix of
      :func:`frames_to_samples`, one ``baddbmm`` with ``2J + 1`` (about 5) multiply-adds per
      gate value instead of ``cond_channels``;
    * one sigmoid gives the whole gate: ``tanh(a) = 2 sigmoid(2a) - 1``, so with the filter
      half of the gate weights doubled, ``sigmoid(b) - 2 sigmoid(2a) sigmoid(b)`` (one
      ``addcmul``) is ``-tanh(a) sigmoid(b)``, whose sign goes into the 1x1s after it;
    * the gated output sits beside a constant 1 so the 1x1 biases are rows of their matrices:
      the residual update ``sqrt(0.5) (h + W g + b)`` is one in-place ``addmm_`` on the one
      activation buffer (causality lets the row blocks run last to first, each still reading
      the layer's input), and the skip sum (scale ``sqrt(1 / n_layers)`` folded in)
      accumulates in place.

    The weights are copied at construction; build a new one after the weights change.
    """

    def __init__(self, stack: WaveNetStack, device: torch.device, dtype: torch.dtype):
        def baked(t: Tensor) -> Tensor:
            return t.detach().to(device, dtype).contiguous()

        def with_bias(conv: nn.Conv1d, rows: slice, scale: float) -> Tensor:
            # [G/2 + 1, C_out] for [-g, 1] @ W: weight negated (the gate's sign), bias kept.
            return baked(torch.cat([-conv.weight[rows, :, 0].t(), conv.bias[rows][None]]) * scale)

        gate = stack.gate_channels
        self.half = gate // 2
        with torch.no_grad():
            gate_scale = torch.ones(gate, device=stack.input.weight.device)
            gate_scale[:self.half] = 2.0
            skip_scale = math.sqrt(1.0 / stack.n_layers)
            self.cond_weight = baked(stack.cond.weight[:, :, 0].t()
                                     * gate_scale.repeat(stack.n_layers))
            self.input_weight = baked(stack.input.weight[:, 0, 0])
            self.input_bias = baked(stack.input.bias)
            # The first layer's input is x w + b per row (the input 1x1 of one channel), so
            # its taps act on the two columns (x, 1) of work.source: [2, G] each, not [C, G].
            first_input = torch.stack([stack.input.weight[:, 0, 0], stack.input.bias]).double()
            self.layers = []
            for i, block in enumerate(stack.blocks):
                conv = block.conv
                k, d = conv.kernel_size, conv.dilation
                taps = []
                for j in range(k):
                    weight = conv.conv.weight[:, :, j].t().double() * gate_scale
                    taps.append(((k - 1 - j) * d, baked(first_input @ weight if i == 0
                                                        else weight)))
                n_res = block.residual_channels if block.has_residual else 0
                self.layers.append((
                    baked(conv.conv.bias * gate_scale),
                    taps,
                    with_bias(block.out, slice(n_res, None), skip_scale),
                    with_bias(block.out, slice(0, n_res), SQRT_HALF) if n_res else None,
                ))
            self.hidden_weight = baked(stack.head[1].weight[:, :, 0].t())
            self.hidden_bias = baked(stack.head[1].bias)
            self.output_weight = baked(stack.head[3].weight[:, :, 0].t())
            self.output_bias = baked(stack.head[3].bias)
        self.gate_channels = gate
        self.padding = max(block.conv.left_padding for block in stack.blocks)

    def __call__(self, h: Tensor, work: LeanWork) -> Tensor:
        """``h [B, T]`` (the flow's input, not yet shifted) -> ``[B, T, 2]`` (mu, unclamped
        log sigma)."""
        batch, length = h.shape
        pad, gate_channels, hop = work.padding, self.gate_channels, work.hop
        rows, skip = work.h, work.skip
        # Every layer's projection of every frame: [frame rows, n_layers * G].
        projected = torch.mm(work.frames, self.cond_weight)
        row = projected.stride(0)
        start = projected.storage_offset() + work.first_window * row
        shifted = F.pad(h, (1, -1))
        torch.addcmul(self.input_bias, shifted.unsqueeze(-1), self.input_weight,
                      out=rows.view(batch, pad + length, -1)[:, pad:])
        work.source.view(batch, pad + length, 2)[:, pad:, 0] = shifted
        for i, (bias, taps, skip_weight, residual_weight) in enumerate(self.layers):
            tap_rows = work.source if i == 0 else rows
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
                torch.baddbmm(bias, work.polyphase[first:last], windows,
                              out=gate.view(last - first, hop, gate_channels))
                for shift, weight in taps:
                    gate.addmm_(tap_rows[pad - shift + r0:pad - shift + r1], weight)
                gate.sigmoid_()
                gated = work.gated[:r1 - r0]
                gate_half = gate[:, self.half:]
                torch.addcmul(gate_half, gate[:, :self.half], gate_half, value=-2.0,
                              out=gated[:, :self.half])
                if i == 0:
                    torch.mm(gated, skip_weight, out=skip[r0:r1])
                else:
                    skip[r0:r1].addmm_(gated, skip_weight)
                if residual_weight is not None:
                    rows[pad + r0:pad + r1].addmm_(gated, residual_weight, beta=SQRT_HALF)
            if residual_weight is not None:
                # Rows between sequences hold junk now; they are the next sequence's padding.
                rows.view(batch, pad + length, -1)[1:, :pad].zero_()
        skip.relu_()
        for first, last in work.blocks:
            r0, r1 = first * hop, last * hop
            hidden = torch.addmm(self.hidden_bias, skip[r0:r1], self.hidden_weight,
                                 out=work.hidden[:r1 - r0])
            hidden.relu_()
            torch.addmm(self.output_bias, hidden, self.output_weight,
                        out=work.out[pad + r0:pad + r1])
        return work.out.view(batch, pad + length, 2)[:, pad:]


class LeanWork:
    """Buffers and conditioning shared by the :class:`LeanFlow` passes of one synthesis.

    Sequences are laid out as blocks of ``hop`` rows: ``pad_frames`` zero blocks, then the
    ``F`` data blocks, repeated per sequence; the flows compute every row from the first data
    row on (the gaps between sequences are junk and ignored). ``frames`` holds the mel
    features after the upsampler's first convolution, one row per block (zero rows in the
    gaps, ``J`` more at the end) and ``polyphase [blocks, hop, 2J + 1]`` the upsampling
    weights of each computed block (zero for the gaps).

    Each layer runs over ``blocks``, ranges of whole hops of about :data:`CPU_BLOCK_ROWS`
    rows on CPU (all rows in one range elsewhere, or when it is ``None``), with the gate and
    the head's hidden layer in buffers of one range. On CPU ranges of a few thousand rows
    keep a layer's intermediates in cache (about 20% faster for the ``paper`` student than
    whole sequences); on a GPU one range for all rows launches the fewest kernels.
    """

    def __init__(self, student: Student, flows: list[LeanFlow], mel: Tensor):
        weight = student.flows[0].input.weight
        device, dtype = weight.device, weight.dtype
        block_rows = CPU_BLOCK_ROWS if device.type == "cpu" else None
        batch, _, frames = mel.shape
        hop = self.hop = student.hop_length
        polyphase, reach = frames_to_samples(student.upsampler, frames, device, dtype)
        pad_frames = max(reach, -(-max(flow.padding for flow in flows) // hop))
        stride = pad_frames + frames
        self.padding = pad_frames * hop
        self.window = 2 * reach + 1
        window_starts = batch * stride - pad_frames
        self.first_window = pad_frames - reach
        step = window_starts if block_rows is None else max(1, block_rows // hop)
        self.blocks = [(first, min(first + step, window_starts))
                       for first in range(0, window_starts, step)]
        features = student.upsampler.frame_conv(mel).transpose(1, 2)
        self.frames = features.new_zeros(batch * stride + reach, features.shape[-1])
        self.frames[:batch * stride].view(batch, stride, -1)[:, pad_frames:] = features
        blocks = polyphase.new_zeros(batch, stride, hop, self.window)
        blocks[:, pad_frames:] = polyphase
        self.polyphase = blocks.view(batch * stride, hop, -1)[pad_frames:]
        stack = student.flows[0]
        rows = batch * stride * hop
        computed = rows - self.padding
        block = min(step * hop, computed)
        residual = stack.blocks[0].residual_channels
        skip = stack.head[1].in_channels
        self.h = torch.zeros(rows, residual, device=device, dtype=dtype)
        self.gate = torch.empty(block, stack.gate_channels, device=device, dtype=dtype)
        self.gated = torch.empty(block, stack.gate_channels // 2 + 1, device=device,
                                 dtype=dtype)
        self.gated[:, -1] = 1.0
        self.skip = torch.empty(computed, skip, device=device, dtype=dtype)
        # The head's hidden layer runs after the last gate: it may reuse the gate's memory.
        self.hidden = (self.gate.view(-1)[:block * skip].view(block, skip)
                       if stack.gate_channels >= skip else torch.empty(block, skip,
                                                                        device=device,
                                                                        dtype=dtype))
        self.out = torch.empty(rows, 2, device=device, dtype=dtype)
        # (x, 1) per data row of the flow's shifted input, (0, 0) in the padding rows: the
        # first layer's taps read it (see LeanFlow).
        source = torch.zeros(batch, stride * hop, 2, device=device, dtype=dtype)
        source[:, self.padding:, 1] = 1.0
        self.source = source.view(rows, 2)


class Student(Vocoder):
    """IAF student of probability density distillation.

    Architecture keywords (all returned by :meth:`arch_config`):

    * ``flow_layers``: residual layers of each flow's WaveNet, one entry per flow (Parallel
      WaveNet: ``[10, 10, 10, 30]``; ClariNet: six flows of 10);
    * ``cycle_length``: dilation of layer ``i`` is ``2 ** (i % cycle_length)``;
    * ``residual_channels``, ``gate_channels`` (even), ``skip_channels``, ``kernel_size``;
    * ``cond_channels``: channels of the upsampled mel, computed once and shared by all flows;
    * ``upsample_scales``, ``frame_context``: the mel upsampler (see
      :class:`~vocoder.nn.wavenet.MelUpsampler`);
    * ``audio_scale``: the flows work in units of this typical audio amplitude, as the
      teacher's WaveNet does: they map unit noise to ``x / audio_scale``, and the student's
      ``x``, ``mu_tot`` are that times ``audio_scale`` (``log_sigma_tot`` gains
      ``log(audio_scale)``), so every flow reads and writes unit-scale signals;
    * ``log_sigma_min``: floor of every flow's log-scale, and the floor at which distillation
      clamps the total log-scale;
    * ``log_sigma_init``: the flows' total log-scale at initialisation, spread evenly over
      their output biases (the last 1x1 of each flow starts at zero, so every flow starts as
      ``z -> z * exp(log_sigma_init / K)``: the identity for 0.0, and the student as
      ``x = audio_scale * z``);
    * ``weight_norm``: weight-normalise the WaveNets while training (removed for inference).
    """

    kind = "student"

    def __init__(self, n_mels: int, hop_length: int,
                 flow_layers: Sequence[int] = (10, 10, 10, 30), cycle_length: int = 10,
                 residual_channels: int = 64, gate_channels: int = 128, skip_channels: int = 64,
                 kernel_size: int = 3, cond_channels: int = 80,
                 upsample_scales: Sequence[int] | None = None, frame_context: int = 1,
                 audio_scale: float = 0.1, log_sigma_min: float = -7.0,
                 log_sigma_init: float = 0.0, weight_norm: bool = False):
        super().__init__(n_mels, hop_length)
        if not audio_scale > 0:
            raise ValueError(f"audio_scale must be positive, got {audio_scale}")
        flow_layers = [int(n) for n in flow_layers]
        if not flow_layers or min(flow_layers) < 1:
            raise ValueError(f"flow_layers must list positive depths, got {flow_layers}")
        self.upsampler = MelUpsampler(n_mels, hop_length, cond_channels, upsample_scales,
                                      frame_context)
        self.flows = nn.ModuleList(
            WaveNetStack(
                in_channels=1, out_channels=2, n_layers=n, cycle_length=cycle_length,
                residual_channels=residual_channels, gate_channels=gate_channels,
                skip_channels=skip_channels, kernel_size=kernel_size,
                cond_channels=cond_channels, weight_norm=weight_norm, zero_init_output=True,
            )
            for n in flow_layers
        )
        with torch.no_grad():
            for flow in self.flows:
                flow.head[-1].bias[1] = float(log_sigma_init) / len(flow_layers)
        self.audio_scale = float(audio_scale)
        self.log_sigma_min = float(log_sigma_min)
        self._arch = dict(
            flow_layers=flow_layers, cycle_length=cycle_length,
            residual_channels=residual_channels, gate_channels=gate_channels,
            skip_channels=skip_channels, kernel_size=kernel_size, cond_channels=cond_channels,
            upsample_scales=list(self.upsampler.scales), frame_context=frame_context,
            audio_scale=self.audio_scale, log_sigma_min=self.log_sigma_min,
            log_sigma_init=float(log_sigma_init),
            weight_norm=weight_norm,
        )
        self._lean: tuple[tuple, list[LeanFlow]] | None = None

    def arch_config(self) -> dict:
        return dict(self._arch)

    @property
    def receptive_field(self) -> int:
        """Past noise samples one output sees: ``mu_tot_t`` depends on
        ``z[t - receptive_field : t]`` (each flow adds its WaveNet's span)."""
        return sum(flow.receptive_field for flow in self.flows)

    def _conditioning(self, mel: Tensor, length: int) -> Tensor:
        self.check_mel_shape(mel, length)
        return self.upsampler(mel)

    def _flow_step(self, mu_tot: Tensor, log_sigma_tot: Tensor, z: Tensor,
                   out: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Fold one flow's ``(mu, log_sigma)`` (each ``[B, T]``, log sigma not yet floored)
        into the totals; returns ``(z^k, mu_tot, log_sigma_tot)``."""
        mu, log_sigma = out
        log_sigma = torch.clamp(log_sigma, min=self.log_sigma_min)
        mu_tot = torch.addcmul(mu, mu_tot, torch.exp(log_sigma))
        log_sigma_tot = log_sigma_tot + log_sigma
        return torch.addcmul(mu_tot, torch.exp(log_sigma_tot), z), mu_tot, log_sigma_tot

    def forward(self, z: Tensor, mel: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``z [B, T]``, ``mel [B, n_mels, T // hop]`` -> ``(x, mu_tot, log_sigma_tot)``, each
        ``[B, T]``, with ``x = mu_tot + exp(log_sigma_tot) * z``.

        ``mu_tot[:, t]`` and ``log_sigma_tot[:, t]`` depend only on ``z[:, :t]`` and the mel.
        Each flow's output is kept in ``z``'s dtype, so under autocast the WaveNets run in low
        precision while the composition of the flows stays in float32.
        """
        z, mel = self._in_model_dtype(z, mel)
        cond = self._conditioning(mel, z.shape[-1])
        mu_tot = torch.zeros_like(z)
        log_sigma_tot = torch.zeros_like(z)
        h = z
        for flow in self.flows:
            out = flow(F.pad(h, (1, -1)).unsqueeze(1), cond).to(z.dtype)
            h, mu_tot, log_sigma_tot = self._flow_step(mu_tot, log_sigma_tot, z,
                                                       out.unbind(1))
        scale = self.audio_scale
        return h * scale, mu_tot * scale, log_sigma_tot + math.log(scale)

    def _lean_flows(self, device: torch.device, dtype: torch.dtype) -> list[LeanFlow]:
        # Baked once per set of weights: any in-place update, load or move changes the key.
        key = (device, dtype) + tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._lean is None or self._lean[0] != key:
            self._lean = (key, [LeanFlow(flow, device, dtype) for flow in self.flows])
        return self._lean[1]

    def sample(self, mel: Tensor, z: Tensor | None = None, sigma: float = 1.0) -> Tensor:
        """Generate ``x [B, F * hop]`` from ``mel [B, n_mels, F]`` in one parallel pass.

        ``z [B, F * hop]`` is the noise (drawn when ``None``; given, the result is
        deterministic), scaled by the temperature ``sigma``. The result is :meth:`forward`'s
        ``x`` up to rounding, computed by the lean inference path (:class:`LeanFlow`).
        """
        # Inference mode is a little faster eagerly (no version counters); torch.compile cannot
        # trace through it and gets no_grad.
        context = torch.no_grad if torch.compiler.is_compiling() else torch.inference_mode
        with context():
            return self._sample(mel, z, sigma)

    def _sample(self, mel: Tensor, z: Tensor | None, sigma: float) -> Tensor:
        weight = self.flows[0].input.weight
        mel = mel.to(weight)
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"mel must be [B, {self.n_mels}, F], got {tuple(mel.shape)}")
        shape = (mel.shape[0], mel.shape[-1] * self.hop_length)
        if z is None:
            z = torch.randn(shape, device=mel.device, dtype=mel.dtype)
        elif tuple(z.shape) != shape:
            raise ValueError(f"z must be {list(shape)} for this mel, got {list(z.shape)}")
        z = z.to(weight) * sigma
        if torch.compiler.is_compiling():
            # Under torch.compile, the module forward: the lean flows' in-place ``out=``
            # products into strided views are not traceable, and dynamo would run them
            # eagerly. The forward does more MACs (the mel projected per sample) but is one
            # graph for the compiler to fuse.
            return self(z, mel)[0]
        flows = self._lean_flows(weight.device, weight.dtype)
        work = LeanWork(self, flows, mel)
        mu_tot = torch.zeros_like(z)
        log_sigma_tot = torch.zeros_like(z)
        h = z
        for flow in flows:
            h, mu_tot, log_sigma_tot = self._flow_step(mu_tot, log_sigma_tot, z,
                                                       flow(h, work).unbind(-1))
        return h.mul_(self.audio_scale)

    def log_prob_of_sample(self, z: Tensor, mel: Tensor) -> tuple[Tensor, Tensor]:
        """The sample ``x [B, T]`` that noise ``z [B, T]`` maps to, and its exact log-density
        under the student (``z ~ N(0, 1)``) in nats per utterance ``[B]``:
        ``sum_t log N(z_t; 0, 1) - log_sigma_tot_t`` (the Jacobian ``dx/dz`` is triangular with
        diagonal ``exp(log_sigma_tot)``)."""
        x, _, log_sigma_tot = self(z, mel)
        log_q = (-0.5 * (z * z + LOG_2PI) - log_sigma_tot).sum(-1)
        return x, log_q

    def training_loss(self, audio: Tensor, mel: Tensor) -> tuple[Tensor, dict[str, float]]:
        raise VocoderError("the student is trained by distillation from a teacher "
                           "(vocoder.distill.DistillationObjective, vocoder-distill)")

    def synthesize(self, mel: Tensor, sigma: float | None = None) -> Tensor:
        """``mel [B, n_mels, F]`` -> audio ``[B, F * hop]`` in one parallel pass;
        ``z ~ N(0, sigma^2)`` with ``sigma`` defaulting to 1.0."""
        return self.sample(mel, sigma=1.0 if sigma is None else sigma)

    def prepare_for_inference(self) -> Student:
        for flow in self.flows:
            flow.remove_weight_norm()
        return super().prepare_for_inference()
