"""Training segments and validation batches from a prepared corpus.

Segments are ``segment_frames`` mel frames and the ``segment_frames * hop`` samples they
describe, starting on a frame boundary: mel frame ``i`` pairs with samples
``[i * hop, (i + 1) * hop)``.

The data order is a pure function of ``(seed, position)``: :class:`SegmentSampler` yields
``(utterance index, crop seed)`` pairs for an endless sequence of shuffled epochs, sharded over
processes, and can start at any position. The trainer stores the position in its checkpoint,
so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vocoder.data.corpus import PreparedCorpus


class SegmentDataset(Dataset):
    """Random crops: ``dataset[(index, crop_seed)] -> (audio [S * hop], mel [n_mels, S])``."""

    def __init__(self, corpus: PreparedCorpus, split: str, segment_frames: int):
        self.corpus = corpus
        self.hop = int(corpus.features["hop_length"])
        self.segment_frames = int(segment_frames)
        seg_samples = self.segment_frames * self.hop
        self.entries = [
            e
            for e in corpus.entries(split)
            if e["frames"] >= self.segment_frames and e["samples"] >= seg_samples
        ]
        if not self.entries:
            raise ValueError(
                f"{corpus.root}: no {split} utterance is at least {self.segment_frames} frames "
                f"({seg_samples} samples) long; lower trainer.segment_frames"
            )

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item) -> tuple[torch.Tensor, torch.Tensor]:
        index, crop_seed = item
        e = self.entries[index]
        last_start = min(
            e["frames"] - self.segment_frames, e["samples"] // self.hop - self.segment_frames
        )
        start = int(np.random.default_rng(crop_seed).integers(0, last_start + 1))
        a0, a1 = start * self.hop, (start + self.segment_frames) * self.hop
        audio = np.asarray(self.corpus.audio(e["name"])[a0:a1], dtype=np.float32) / 32768.0
        mel = np.array(self.corpus.mel(e["name"])[:, start : start + self.segment_frames])
        return torch.from_numpy(audio), torch.from_numpy(mel)


class SegmentSampler(Sampler):
    """Endless, resumable, sharded shuffle: yields ``(index, crop_seed)``.

    Global position ``p`` (counted per process) of rank ``r`` out of ``W`` is item
    ``p * W + r`` of the concatenation of epochs, each a fresh permutation seeded by
    ``(seed, epoch)``.
    """

    def __init__(self, n_items: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.n_items, self.seed = n_items, seed
        self.rank, self.world_size = rank, world_size
        self.start = start

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_items)

    def __iter__(self):
        position = self.start
        cached_epoch, perm = -1, None
        while True:
            global_index = position * self.world_size + self.rank
            epoch, offset = divmod(global_index, self.n_items)
            if epoch != cached_epoch:
                cached_epoch, perm = epoch, self._permutation(epoch)
            yield int(perm[offset]), (self.seed, epoch, offset)
            position += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for progress estimates
        return 2**62


def validation_batches(
    corpus: PreparedCorpus, split: str, n_utterances: int, segment_frames: int, batch_size: int
):
    """A fixed list of ``(audio [B, S * hop], mel [B, n_mels, S])`` batches: the first
    ``n_utterances`` long-enough utterances of ``split``, each cropped at its middle."""
    dataset = SegmentDataset(corpus, split, segment_frames)
    hop = dataset.hop
    audios, mels = [], []
    for e in dataset.entries[:n_utterances]:
        frames = min(e["frames"], e["samples"] // hop)
        start = (frames - segment_frames) // 2
        a = np.asarray(corpus.audio(e["name"])[start * hop : (start + segment_frames) * hop])
        audios.append(torch.from_numpy(a.astype(np.float32) / 32768.0))
        mels.append(
            torch.from_numpy(np.array(corpus.mel(e["name"])[:, start : start + segment_frames]))
        )
    return [
        (torch.stack(audios[i : i + batch_size]), torch.stack(mels[i : i + batch_size]))
        for i in range(0, len(audios), batch_size)
    ]
