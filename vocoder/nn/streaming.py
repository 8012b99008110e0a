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

    def __init__(self, upsampler: MelUpsampler | None, lookahead_frames: int = 0):
        self.upsampler = upsampler
        # At least the upsampler's; more when something else reads the same frames further
        # ahead (an excitation source, see vocoder.nn.excitation). Without an upsampler only
        # the frame bookkeeping (push_frames, flush_frames) is used.
        self.lookahead_frames = max(0 if upsampler is None else upsampler.lookahead_frames,
                                    int(lookahead_frames))
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
        return self.conditioning(self.push_frames(mel))

    def flush(self) -> Tensor | None:
        """The conditioning of every frame not yet handed out (``None`` before any push)."""
        if self.frames is None:
            return None
        return self.conditioning(self.flush_frames())

    def push_frames(self, mel: Tensor) -> tuple[Tensor, int, int]:
        """:meth:`push` before upsampling: ``(window [B, n_mels, w], a, b)``, the frames
        ``a .. b - 1`` of ``window`` being the newly final ones (``a == b``: none) and the rest
        the context their conditioning reads."""
        self.frames = mel if self.frames is None else torch.cat([self.frames, mel], dim=-1)
        self.received += mel.shape[-1]
        return self._take(self.received - self.lookahead_frames)

    def flush_frames(self) -> tuple[Tensor, int, int]:
        """:meth:`flush` before upsampling (after at least one push)."""
        assert self.frames is not None
        return self._take(self.received)

    def conditioning(self, taken: tuple[Tensor, int, int]) -> Tensor:
        """The upsampled conditioning ``[B, C, (b - a) * hop]`` of what :meth:`push_frames` or
        :meth:`flush_frames` returned."""
        window, a, b = taken
        if a == b:
            return window.new_zeros(window.shape[0], self.upsampler.out_channels, 0)
        hop = self.upsampler.hop_length
        return self.upsampler(window)[..., a * hop:b * hop]

    def _take(self, end: int) -> tuple[Tensor, int, int]:
        assert self.frames is not None
        end = max(end, self.emitted)
        start = max(0, self.emitted - self.margin)
        if end == self.emitted:
            return self.frames[..., :0], 0, 0
        window = self.frames[..., start - self.offset:self.received - self.offset]
        taken = (window, self.emitted - start, end - start)
        self.emitted = end
        keep_from = max(0, self.emitted - self.margin)
        self.frames = self.frames[..., keep_from - self.offset:]
        self.offset = keep_from
        return taken
