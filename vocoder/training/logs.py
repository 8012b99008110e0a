"""A run's logs: ``metrics.jsonl`` (one JSON row per event) and TensorBoard scalars, audio
and mel pictures. Only the main process writes; the others get a log that does nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


class RunLog:
    """Opened by :meth:`open` at the start of :meth:`Trainer.fit`, closed by :meth:`close`."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, log=print):
        self.run_dir, self.enabled, self.tensorboard, self.log = run_dir, enabled, tensorboard, log
        self._file = None
        self._writer = None

    def open(self) -> None:
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a")
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self.log("note: tensorboard is not installed; logging to metrics.jsonl only")

    def write(self, kind: str, step: int, values: dict) -> None:
        """One row ``{"kind": kind, "step": step, **values}``; finite numbers also go to
        TensorBoard as ``kind/key``."""
        if self._file is None:
            return
        self._file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._writer.add_scalar(f"{kind}/{k}", v, step)

    @property
    def has_media(self) -> bool:
        return self._writer is not None

    def audio_and_mel(self, step: int, reference: torch.Tensor, generated: torch.Tensor,
                      sample_rate: int, features: dict) -> None:
        """Both waveforms ``[T]`` as TensorBoard audio and their log-mels as one picture."""
        if self._writer is None:
            return
        self._writer.add_audio("sample/generated", generated.clamp(-1, 1), step,
                               sample_rate=sample_rate)
        self._writer.add_audio("sample/reference", reference, step, sample_rate=sample_rate)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            from vocoder.features import MelFrontEnd

            fe = MelFrontEnd.from_dict(features)
            fig, axes = plt.subplots(2, 1, figsize=(6, 4), sharex=True)
            for ax, x, title in ((axes[0], reference, "reference"),
                                 (axes[1], generated, "generated")):
                ax.imshow(fe(x.clamp(-1, 1)).numpy(), origin="lower", aspect="auto")
                ax.set_title(title)
            fig.tight_layout()
            self._writer.add_figure("sample/mel", fig, step)
            plt.close(fig)
        except Exception as e:  # noqa: BLE001 - a picture must never stop training
            self.log(f"note: could not draw the mel picture ({e})")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None
