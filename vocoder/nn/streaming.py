"""Mel frames arriving a few at a time, turned into the conditioning of every sample that no
longer depends on frames still to come.

:class:`~vocoder.nn.wavenet.MelUpsampler` is not causal: the samples of frame ``i`` read frames
``i - L .. i + L`` (``L`` = :attr:`~vocoder.nn.wavenet.MelUpsampler.lookahead_frames`), with the
edge frames replicated past either end of the utterance. A stream therefore holds back the last
``L`` frames it has received until more arrive or the utterance ends, and runs the upsampler on a
window of frames wide enough that the edge replication of the window never reaches the samples
it hands out. Those samples are then exactly what the upsampler gives on the whole mel.

Shapes: ``B`` batch, ``C`` conditioning channels, ``f`` frames in a chunk, ``hop`` samples per
frame.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vocoder.nn.wavenet import MelUpsampler


class ConditioningStream:
    """``push(mel [B, n_mels, f]) -> cond [B, C, n * hop]`` for the ``n >= 0`` frames that just
    became final; ``flush() -> cond`` for the rest, the end of the utterance being known.

    Kept between calls: the frames not yet handed out plus ``margin`` frames before them, so
    memory stays bounded however long the stream runs.
    """

    def __init__(self, upsampler: MelUpsampler):
        self.upsampler = upsampler
        self.lookahead_frames = upsampler.lookahead_frames
        # Frames of context on each side of the frames handed out: past them the window's edge
        # replication cannot reach.
        self.margin = self.lookahead_frames + 1
        self.frames: Tensor | None = None  # [B, n_mels, kept], starting at frame `offset`
        self.offset = 0
        self.received = 0
        self.emitted = 0

    def push(self, mel: Tensor) -> Tensor:
        """Append ``mel [B, n_mels, f]``; returns the conditioning of the frames that are final
        now (those with ``lookahead_frames`` frames after them), ``[B, C, n * hop]``."""
        self.frames = mel if self.frames is None else torch.cat([self.frames, mel], dim=-1)
        self.received += mel.shape[-1]
        return self._emit(self.received - self.lookahead_frames)

    def flush(self) -> Tensor | None:
        """The conditioning of every frame not yet handed out (``None`` before any push)."""
        if self.frames is None:
            return None
        return self._emit(self.received)

    def _emit(self, end: int) -> Tensor:
        assert self.frames is not None
        end = max(end, self.emitted)
        start = max(0, self.emitted - self.margin)
        if end == self.emitted:
            batch = self.frames.shape[0]
            return self.frames.new_zeros(batch, self.upsampler.out_channels, 0)
        window = self.frames[..., start - self.offset:self.received - self.offset]
        hop = self.upsampler.hop_length
        cond = self.upsampler(window)[..., (self.emitted - start) * hop:(end - start) * hop]
        self.emitted = end
        keep_from = max(0, self.emitted - self.margin)
        self.frames = self.frames[..., keep_from - self.offset:]
        self.offset = keep_from
        return cond
