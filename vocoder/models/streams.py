"""Streaming synthesis: mel frames in as an acoustic model produces them, audio out as soon as
it is final.

``stream = model.stream(sigma=None)``; ``stream.push(mel_chunk [B, n_mels, f], z_chunk=None)
-> audio [B, n]`` takes the next ``f >= 1`` frames (and optionally their standard normal noise
``[B, f * hop]``) and returns every sample that can no longer change; ``stream.flush() -> audio``
ends the utterance and returns the rest. ``stream.lookahead_frames`` is the algorithmic latency:
a frame's samples come out once that many further frames have been pushed.

* :class:`StudentStream` and :class:`TeacherStream` are **exact**: the pieces, concatenated,
  equal ``model.synthesize(mel, sigma, z)`` of the whole mel with the same noise, for any
  chunking (float rounding aside). Both models are causal in their noise and read a bounded
  number of future frames through the mel upsampler (:class:`~vocoder.nn.streaming.
  ConditioningStream`). The student keeps, per flow, its last input sample and every layer's
  last inputs, and runs the engine of its whole-utterance synthesis; the teacher keeps its
  sampler's tap buffers.
* :class:`ChunkedStream` (WaveGlow, which is not causal) synthesises windows with
  ``context_frames`` of real mel on each side of the samples it hands out; the seams differ a
  little from whole-utterance synthesis (measured in docs/BENCHMARKS.md), so ``exact`` is
  ``False``.

Shapes: ``B`` batch (fixed by the first push), ``f`` frames per push, ``hop`` samples per frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vocoder.nn.parallel import ParallelWork
from vocoder.nn.streaming import ConditioningStream


class SynthesisStream:
    """What every stream shares: input checks, the noise queue and the output type."""

    #: Whether the concatenated pieces equal whole-utterance synthesis.
    exact = True
    lookahead_frames = 0

    def __init__(self, model, sigma: float):
        self.model = model
        self.sigma = float(sigma)
        self.batch: int | None = None
        self._noise: list[Tensor] = []
        self._queued = 0
        self._flushed = False
        self._dtype = next(model.parameters()).dtype
        self._device = next(model.parameters()).device

    def push(self, mel_chunk: Tensor, z_chunk: Tensor | None = None) -> Tensor:
        """The next frames ``mel_chunk [B, n_mels, f]`` (``f >= 1``) and their standard normal
        noise ``z_chunk [B, f * hop]`` (drawn when ``None``) -> the samples now final,
        ``[B, n]``."""
        mel, z = mel_chunk, z_chunk
        if self._flushed:
            raise RuntimeError("this stream was flushed; start a new one with model.stream()")
        if mel.dim() != 3 or mel.shape[-1] < 1:
            raise ValueError(f"mel must be [B, {self.model.n_mels}, f] with f >= 1, "
                             f"got {tuple(mel.shape)}")
        if self.batch is not None and mel.shape[0] != self.batch:
            raise ValueError(f"this stream has batch {self.batch}, got a mel of batch "
                             f"{mel.shape[0]}")
        mel = mel.to(self._device, self._dtype)
        noise = self.model.noise(mel, z) * self.sigma
        self.batch = mel.shape[0]
        self._noise.append(noise)
        self._queued += noise.shape[-1]
        with torch.inference_mode():
            return self._advance(mel)

    def flush(self) -> Tensor:
        """End the utterance: every sample not yet returned, ``[B, n]``."""
        if self._flushed:
            raise RuntimeError("this stream was already flushed")
        self._flushed = True
        if self.batch is None:
            return torch.zeros(0, 0, device=self._device, dtype=self._dtype)
        with torch.inference_mode():
            return self._finish()

    def _take_noise(self, n: int) -> Tensor:
        """The next ``n`` samples of queued noise ``[B, n]``."""
        noise = torch.cat(self._noise, dim=-1) if len(self._noise) > 1 else self._noise[0]
        self._noise = [noise[:, n:]]
        self._queued -= n
        return noise[:, :n]

    def _advance(self, mel: Tensor) -> Tensor:
        raise NotImplementedError

    def _finish(self) -> Tensor:
        raise NotImplementedError


class _CausalStream(SynthesisStream):
    """A model causal in its noise: conditioning from :class:`ConditioningStream` (and the
    excitation source, for a model with one, continued from piece to piece), then
    :meth:`_generate` on the samples it covers."""

    def __init__(self, model, sigma: float):
        super().__init__(model, sigma)
        excitation = model.excitation
        self.conditioning = ConditioningStream(
            model.upsampler, 0 if excitation is None else excitation.stream_lookahead_frames)
        self.lookahead_frames = self.conditioning.lookahead_frames
        self._phase = None

    def _advance(self, mel: Tensor) -> Tensor:
        return self._run(self.conditioning.push_frames(mel))

    def _finish(self) -> Tensor:
        return self._run(self.conditioning.flush_frames())

    def _source(self, taken: tuple[Tensor, int, int]) -> Tensor | None:
        """The excitation source ``[B, K, n]`` of the frames taken (``None`` without one)."""
        excitation = self.model.excitation
        if excitation is None:
            return None
        window, a, b = taken
        source, self._phase = excitation.from_mel_frames(window, a, b, self._phase)
        return source

    def _run(self, taken: tuple[Tensor, int, int]) -> Tensor:
        window, a, b = taken
        if a == b:
            return window.new_zeros(self.batch, 0)
        cond = self.conditioning.conditioning(taken)
        return self._generate(self._take_noise(cond.shape[-1]), cond, self._source(taken))

    def _generate(self, z: Tensor, cond: Tensor, source: Tensor | None) -> Tensor:
        raise NotImplementedError


class StudentStream(_CausalStream):
    """The IAF student's baked flows (:class:`~vocoder.nn.parallel.ParallelStack`, the engine
    of :meth:`~vocoder.models.student.Student.synthesize`) run on each new piece of noise
    from kept state: per flow, its last input sample and every layer's last inputs
    (:class:`~vocoder.nn.parallel.StackState`). The conditioning is the polyphase form of
    the frames that just became final, read from a window of frames around them."""

    def _run(self, taken: tuple[Tensor, int, int]) -> Tensor:
        window, a, b = taken
        if a == b:
            return window.new_zeros(self.batch, 0)
        model = self.model
        z = self._take_noise((b - a) * model.hop_length)
        flows = model._parallel_flows(z.device, z.dtype)
        if not hasattr(self, "_states"):
            self._states = [flow.initial_state(self.batch) for flow in flows]
        work = ParallelWork(model.upsampler, flows, window, emit=(a, b),
                            source=self._source(taken))
        mu_tot = torch.zeros_like(z)
        log_sigma_tot = torch.zeros_like(z)
        h = z
        for flow, state in zip(flows, self._states, strict=True):
            h, mu_tot, log_sigma_tot = model._flow_step(mu_tot, log_sigma_tot, z,
                                                        flow(h, work, state).unbind(-1))
        return h * model.audio_scale


class TeacherStream(_CausalStream):
    """The autoregressive teacher's cached sampler, continued across pushes."""

    def _generate(self, z: Tensor, cond: Tensor, source: Tensor | None) -> Tensor:
        if not hasattr(self, "_chunks"):
            self._chunks = self.model._sampling_chunks(self.batch, cuda_graph=False)
            self._chunks.start()
        chunks = self._chunks
        noise = z.t().contiguous().unsqueeze(-1)  # time-major [n, B, 1]
        x = torch.empty_like(noise)
        if source is not None:
            source = source.permute(2, 0, 1).contiguous()  # time-major [n, B, K]
        for begin in range(0, noise.shape[0], chunks.steps):
            end = min(begin + chunks.steps, noise.shape[0])
            chunks.run(cond[:, :, begin:end], noise[begin:end], x[begin:end],
                       None if source is None else source[begin:end])
        return x.squeeze(-1).t().contiguous()


class ChunkedStream(SynthesisStream):
    """Chunked synthesis for a model that is not causal (WaveGlow): each push synthesises the
    frames not yet handed out except the last ``context_frames``, inside a window with
    ``context_frames`` of mel (and noise) on each side; :meth:`flush` does the rest. Not exact:
    the window edges differ from the whole utterance's neighbourhood."""

    exact = False

    def __init__(self, model, sigma: float, context_frames: int = 8):
        super().__init__(model, sigma)
        if context_frames < 0:
            raise ValueError(f"context_frames must be >= 0, got {context_frames}")
        self.context_frames = self.lookahead_frames = int(context_frames)
        self._mel: Tensor | None = None  # frames from `_offset` on
        self._z: Tensor | None = None
        # With excitation: the source of the frames that are final (its phase runs on from
        # the start of the utterance), kept from `_offset` on like the mel; each window reads
        # it and continues it provisionally over the frames not yet final.
        self._excitation = model.excitation
        if self._excitation is not None:
            self._frames = ConditioningStream(None, self._excitation.stream_lookahead_frames)
            self._source: Tensor | None = None  # frames `_source_start` .. final
            self._source_start = 0
            self._phase = None
        self._offset = 0
        self._received = 0
        self._emitted = 0

    def _advance(self, mel: Tensor) -> Tensor:
        self._mel = mel if self._mel is None else torch.cat([self._mel, mel], dim=-1)
        self._z = self._take_noise(self._queued) if self._z is None else torch.cat(
            [self._z, self._take_noise(self._queued)], dim=-1)
        self._received += mel.shape[-1]
        if self._excitation is not None:
            self._extend_source(self._frames.push_frames(mel))
        return self._emit(self._received - self.context_frames)

    def _finish(self) -> Tensor:
        if self._excitation is not None:
            self._extend_source(self._frames.flush_frames())
        return self._emit(self._received)

    def _extend_source(self, taken: tuple[Tensor, int, int]) -> None:
        window, a, b = taken
        if a == b:
            return
        piece, self._phase = self._excitation.from_mel_frames(window, a, b, self._phase)
        self._source = piece if self._source is None else torch.cat([self._source, piece], -1)

    def _window_source(self, first: int, last: int) -> Tensor:
        """The source of frames ``first .. last - 1``: the final one, continued over the
        frames not yet final from the mel received so far."""
        hop, final = self.model.hop_length, self._frames.emitted
        parts = []
        if first < final:
            parts.append(self._source[..., (first - self._source_start) * hop:
                                      (min(last, final) - self._source_start) * hop])
        if last > final:
            context = max(self._offset, final - self._excitation.stream_lookahead_frames - 1)
            mel = self._mel[..., context - self._offset:last - self._offset]
            guess = self._excitation.from_mel_frames(mel, final - context, last - context,
                                                     self._phase)[0]
            parts.append(guess[..., max(0, first - final) * hop:])
        return torch.cat(parts, -1)

    def _emit(self, end: int) -> Tensor:
        assert self._mel is not None and self._z is not None
        if end <= self._emitted:
            return self._mel.new_zeros(self.batch, 0)
        hop, start = self.model.hop_length, self._emitted
        first = max(0, start - self.context_frames)
        last = min(self._received, end + self.context_frames)
        mel = self._mel[..., first - self._offset:last - self._offset]
        z = self._z[:, (first - self._offset) * hop:(last - self._offset) * hop]
        # The noise was scaled on arrival: synthesise at temperature 1.
        if self._excitation is None:
            audio = self.model.synthesize(mel, sigma=1.0, z=z)
        else:
            audio = self.model.synthesize(mel, sigma=1.0, z=z,
                                          source=self._window_source(first, last))
        out = audio[:, (start - first) * hop:(end - first) * hop]
        self._emitted = end
        keep = max(0, end - self.context_frames)
        if self._excitation is not None:
            # The frames before the final source's end that its continuation reads.
            final = self._frames.emitted
            keep = min(keep, max(0, final - self._excitation.stream_lookahead_frames - 1))
            drop = min(keep, final) - self._source_start
            if drop > 0:
                self._source = self._source[..., drop * hop:]
                self._source_start += drop
        self._mel = self._mel[..., keep - self._offset:]
        self._z = self._z[:, (keep - self._offset) * hop:]
        self._offset = keep
        return out
