"""Losses shared by training and evaluation.

:class:`MultiResolutionSTFTLoss` is the one STFT magnitude loss: the distillation objective
adds it to the KL, and :func:`vocoder.metrics.mr_stft_distance` reports it as a metric.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)
# Audio in [-1, 1] comes from 16-bit integers k / 32768: one quantisation step.
QUANTISATION_STEP = 1.0 / 32768


def dequantise(audio: Tensor) -> Tensor:
    """``audio`` (16-bit values ``k / 32768``) plus uniform noise over its quantisation bin,
    ``U(-1/2, 1/2)`` steps, centred so the noise adds no bias: the continuous density of the
    result bounds the likelihood of the discrete data. The one convention of the package
    (the teacher's and WaveGlow's likelihoods; before session 8 WaveGlow drew ``U(0, 1)``
    steps)."""
    return audio + (torch.rand_like(audio) - 0.5) * QUANTISATION_STEP


def gaussian_log_prob(x: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    """Elementwise ``log N(x; mu, exp(log_sigma)^2)`` in nats."""
    z = (x - mu) * torch.exp(-log_sigma)
    return -0.5 * (z * z + LOG_2PI) - log_sigma


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Elementwise ``log N(z; 0, 1)`` in nats."""
    return -0.5 * (z * z + LOG_2PI)

DEFAULT_RESOLUTIONS: tuple[tuple[int, int, int], ...] = (
    (512, 128, 512),
    (1024, 256, 1024),
    (2048, 512, 2048),
)


class MultiResolutionSTFTLoss(nn.Module):
    """Multi-resolution STFT distance between ``predicted`` and ``target`` audio ``[B, T]``.

    For each resolution ``(n_fft, hop_length, win_length)`` both signals go through a
    Hann-windowed, centred (reflect-padded) STFT and ``S = sqrt(max(|X|^2, power_floor))``.
    With ``S_t`` the target's and ``S_p`` the prediction's magnitudes, per utterance::

        spectral convergence  SC  = ||S_t - S_p||_F / ||S_t||_F
        log magnitude         LM  = mean over (frequency, frame) of |ln S_t - ln S_p|

    The loss is the mean over resolutions of ``SC + LM``, averaged over the batch: a scalar,
    zero when the two signals are equal. ``power_floor`` (1e-7, the floor Parallel WaveGAN
    uses) keeps the logarithm and its gradient finite in silence; its magnitude, about 3e-4,
    is near the level of 16-bit quantisation noise in a 512-2048 point Hann-windowed frame,
    so differences below the noise of the data itself are ignored.

    Gradients flow into both inputs; the computation runs in float32 on the inputs' device.
    """

    def __init__(self, resolutions: Sequence[Sequence[int]] = DEFAULT_RESOLUTIONS,
                 power_floor: float = 1e-7):
        super().__init__()
        self.resolutions = tuple(tuple(int(v) for v in r) for r in resolutions)
        if not self.resolutions:
            raise ValueError("MultiResolutionSTFTLoss needs at least one resolution")
        for n_fft, hop_length, win_length in self.resolutions:
            if not (0 < hop_length and 0 < win_length <= n_fft):
                raise ValueError(f"bad STFT resolution (n_fft={n_fft}, hop={hop_length}, "
                                 f"win={win_length}): need hop > 0 and 0 < win <= n_fft")
        self.power_floor = float(power_floor)
        for i, (_, _, win_length) in enumerate(self.resolutions):
            self.register_buffer(f"window{i}", torch.hann_window(win_length), persistent=False)

    def min_samples(self) -> int:
        """Shortest signal the largest resolution's reflect padding accepts."""
        return max(n_fft // 2 + 1 for n_fft, _, _ in self.resolutions)

    def _magnitude(self, audio: Tensor, index: int) -> Tensor:
        n_fft, hop_length, win_length = self.resolutions[index]
        spec = torch.stft(audio, n_fft=n_fft, hop_length=hop_length, win_length=win_length,
                          window=getattr(self, f"window{index}"), center=True,
                          pad_mode="reflect", return_complex=True)
        # Clamping the power (not the magnitude) keeps sqrt's gradient finite at zero.
        power = spec.real.square() + spec.imag.square()
        return torch.sqrt(torch.clamp(power, min=self.power_floor))

    def terms(self, predicted: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(SC, LM)``: spectral convergence and log-magnitude distance, each a scalar
        averaged over resolutions and batch (the loss is their sum)."""
        if predicted.shape != target.shape or predicted.dim() != 2:
            raise ValueError("MultiResolutionSTFTLoss expects predicted and target of the same "
                             f"shape [B, T], got {tuple(predicted.shape)} and "
                             f"{tuple(target.shape)}")
        if target.shape[-1] < self.min_samples():
            raise ValueError(f"audio of {target.shape[-1]} samples is too short for an STFT of "
                             f"{max(r[0] for r in self.resolutions)} points "
                             f"(needs at least {self.min_samples()})")
        predicted, target = predicted.float(), target.float()
        convergence, log_magnitude = [], []
        for index in range(len(self.resolutions)):
            s_pred = self._magnitude(predicted, index)
            s_true = self._magnitude(target, index)
            diff_energy = (s_true - s_pred).square().sum(dim=(1, 2))
            # sqrt has an infinite slope at 0: a tiny floor keeps the gradient of two equal
            # signals at zero instead of NaN (the value stays ~1e-15 relative).
            ratio = torch.sqrt(torch.clamp(diff_energy, min=1e-30)
                               / s_true.square().sum(dim=(1, 2)))
            convergence.append(ratio.mean())
            log_magnitude.append((torch.log(s_true) - torch.log(s_pred)).abs().mean())
        return torch.stack(convergence).mean(), torch.stack(log_magnitude).mean()

    def forward(self, predicted: Tensor, target: Tensor) -> Tensor:
        convergence, log_magnitude = self.terms(predicted, target)
        return convergence + log_magnitude
