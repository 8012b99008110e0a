"""Pitch during training: does the model's free-running audio carry the reference's pitch?

A likelihood or KL can improve for a long time while the audio stays whispered, so every
run also synthesises a few fixed validation segments from their mels (the teacher by cached
sampling, the student and WaveGlow in one pass, all with fixed noise) and compares them with
the recordings:

* ``pitch_periodicity``: :func:`~vocoder.metrics.periodicity` of the synthesis at the
  reference's F0 (``pitch_periodicity_reference``: the same of the recording, the ceiling);
* ``pitch_voicing_error`` and ``pitch_vuv_f1``: pyin's voiced/unvoiced decisions on the
  synthesis against the reference contour (error rate; F1 of "voiced");
* ``pitch_f0_rmse_cents``: over frames voiced in both (NaN when there are none);
* for a model with a per-sample likelihood (the teacher), ``nll_voiced`` / ``nll_unvoiced``:
  its teacher-forced NLL (nats per sample) on the recordings, split by the reference's
  voicing (with excitation, given the recording's own source, as in training).

The reference contour is the corpus's true F0 where it has one (the demo corpus), else pyin's
estimate on the recording, computed once.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vocoder.data.corpus import PreparedCorpus
from vocoder.metrics import estimate_f0, f0_metrics, periodicity


class PitchProbe:
    """``n_segments`` fixed segments of ``frames`` mel frames from ``split`` (each cropped at
    the middle of its utterance) and their reference F0, for :meth:`measure`."""

    def __init__(self, corpus: PreparedCorpus, split: str, n_segments: int, frames: int,
                 seed: int = 0):
        features = corpus.features
        self.sample_rate, self.hop = int(features["sample_rate"]), int(features["hop_length"])
        audios, mels, contours = [], [], []
        for entry in corpus.entries(split):
            usable = min(entry["frames"], entry["samples"] // self.hop)
            if usable < frames:
                continue
            start = (usable - frames) // 2
            samples = slice(start * self.hop, (start + frames) * self.hop)
            audio = np.asarray(corpus.audio(entry["name"])[samples], dtype=np.float32) / 32768.0
            true_f0 = corpus.f0(entry["name"])
            contour = (true_f0[start:start + frames + 1] if true_f0 is not None
                       else estimate_f0(audio, self.sample_rate, self.hop))
            audios.append(torch.from_numpy(audio))
            mel = np.array(corpus.mel(entry["name"])[:, start:start + frames])
            mels.append(torch.from_numpy(mel))
            contours.append(np.asarray(contour, dtype=np.float64))
            if len(audios) == n_segments:
                break
        if not audios:
            raise ValueError(f"no {split} utterance has {frames} frames for the pitch probe")
        self.audio, self.mel, self.f0 = torch.stack(audios), torch.stack(mels), contours
        generator = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(self.audio.shape, generator=generator)
        self.reference_periodicity = float(np.nanmean(
            [periodicity(a, f, self.sample_rate, self.hop)
             for a, f in zip(audios, contours, strict=True)]))

    def _voiced_samples(self) -> torch.Tensor:
        """``[N, T]`` bool: samples whose nearest frame centre the reference calls voiced."""
        length = self.audio.shape[-1]
        frame = torch.clamp((torch.arange(length) + self.hop // 2) // self.hop,
                            max=min(len(f) for f in self.f0) - 1)
        voiced = torch.stack([torch.from_numpy(f > 0) for f in self.f0])
        return voiced[:, frame]

    @torch.no_grad()
    def measure(self, model, device: torch.device,
                sigma: float | None = None) -> dict[str, float]:
        """The pitch metrics (see the module docstring) of ``model`` (in eval mode), sampled
        at temperature ``sigma`` (``None``: the model's default)."""
        dtype = next(model.parameters()).dtype
        mel = self.mel.to(device, dtype)
        synthesis = model.synthesize(mel, sigma=sigma, z=self.noise.to(device, dtype))
        synthesis = synthesis.float().cpu().numpy()
        rows = []
        for syn, contour in zip(synthesis, self.f0, strict=True):
            row = f0_metrics(contour, estimate_f0(syn, self.sample_rate, self.hop))
            row["periodicity"] = periodicity(syn, contour, self.sample_rate, self.hop)
            rows.append(row)
        frames = sum(r["frames"] for r in rows)
        voiced_both = sum(r["voiced_both"] for r in rows)
        squared = sum(r["f0_rmse_cents"] ** 2 * r["voiced_both"] for r in rows
                      if r["voiced_both"])
        voiced_ref, voiced_syn = (sum(r[k] for r in rows) for k in ("voiced_ref", "voiced_syn"))
        result = {
            "pitch_periodicity": float(np.nanmean([r["periodicity"] for r in rows])),
            "pitch_periodicity_reference": self.reference_periodicity,
            "pitch_voicing_error": sum(r["voicing_error"] * r["frames"] for r in rows) / frames,
            "pitch_vuv_f1": (2 * voiced_both / (voiced_ref + voiced_syn)
                             if voiced_ref + voiced_syn else math.nan),
            "pitch_f0_rmse_cents": math.sqrt(squared / voiced_both) if voiced_both else math.nan,
        }
        if model.kind == "teacher":
            from vocoder.losses import gaussian_log_prob

            audio = self.audio.to(device, dtype)
            # With excitation, given the audio's own source (the training conditioning).
            source = (None if model.excitation is None
                      else model.excitation.analyse(audio, mel)[0])
            mu, log_sigma = model(audio, mel, source)
            nll = -gaussian_log_prob(audio, mu, log_sigma).float().cpu()
            voiced = self._voiced_samples()
            for name, mask in (("nll_voiced", voiced), ("nll_unvoiced", ~voiced)):
                result[name] = float(nll[mask].mean()) if mask.any() else math.nan
        return result
