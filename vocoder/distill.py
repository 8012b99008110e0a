"""Probability density distillation: KL(student || teacher) and the objective that trains the
student on it.

The student draws ``x`` from its own noise in one parallel pass; the frozen teacher scores that
``x`` in one parallel pass too (gradients flow through its activations into ``x``). Given the
past, both models are Gaussian at every step, so the KL has two estimators with the same
expectation:

* **closed form** (the default): ``sum_t KL(N(mu_S, s_S) || N(mu_T, s_T))`` of the per-step
  Gaussians, :func:`gaussian_kl`; it integrates the noise of step ``t`` out analytically and so
  has much lower variance;
* **Monte Carlo**: ``log q(x) - log p(x)``, the student's exact density of its own sample
  (``sum_t log N(z_t) - log s_S,t``) minus the teacher's.

Shapes: ``B`` batch, ``T`` samples, ``F`` mel frames, ``T = F * hop``. KL values are in nats.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from vocoder.losses import gaussian_log_prob, standard_normal_log_prob

ESTIMATORS = ("closed_form", "monte_carlo")


def gaussian_kl(mu_s: Tensor, log_sigma_s: Tensor, mu_t: Tensor, log_sigma_t: Tensor) -> Tensor:
    """Elementwise ``KL(N(mu_s, s_s^2) || N(mu_t, s_t^2))`` in nats:
    ``log(s_t / s_s) + (s_s^2 + (mu_s - mu_t)^2) / (2 s_t^2) - 1/2``.

    Computed from log-scales without forming either sigma: with ``r = log s_s - log s_t``,
    ``(expm1(2r) + ((mu_s - mu_t) / s_t)^2) / 2 - r``, which stays accurate when the two
    Gaussians are close (the KL then is far smaller than either term of the plain formula).
    """
    log_ratio = log_sigma_s - log_sigma_t
    scaled_gap = (mu_s - mu_t) * torch.exp(-log_sigma_t)
    return 0.5 * (torch.expm1(2.0 * log_ratio) + scaled_gap.square()) - log_ratio


class DistillationPass(NamedTuple):
    """One student sample scored by the teacher; every field ``[B, T]``."""

    z: Tensor
    x: Tensor
    mu_student: Tensor
    log_sigma_student: Tensor
    mu_teacher: Tensor
    log_sigma_teacher: Tensor


def distillation_pass(student: nn.Module, teacher: nn.Module, mel: Tensor,
                      z: Tensor | None = None) -> DistillationPass:
    """Draw ``z ~ N(0, 1)`` ``[B, F * hop]`` (unless given), run the student on it and score
    its sample with the teacher (given the student's excitation source, when both have one).
    The teacher's outputs are returned in the dtype of ``x``, so under autocast the KL is
    still computed in float32."""
    if z is None:
        z = torch.randn(mel.shape[0], mel.shape[-1] * student.hop_length, device=mel.device,
                        dtype=mel.dtype)
    # One excitation source for both (the student's; see vocoder.nn.excitation).
    source = student.source(mel) if getattr(student, "excitation", None) is not None else None
    x, mu_s, log_sigma_s = student(z, mel) if source is None else student(z, mel, source)
    if getattr(teacher, "excitation", None) is not None and source is not None:
        mu_t, log_sigma_t = teacher(x, mel, source)
    else:
        mu_t, log_sigma_t = teacher(x, mel)
    return DistillationPass(z, x, mu_s, log_sigma_s, mu_t.to(x.dtype), log_sigma_t.to(x.dtype))


def floored(run: DistillationPass, student: nn.Module, teacher: nn.Module) -> tuple[Tensor, Tensor]:
    """``(log_sigma_student, log_sigma_teacher)`` clamped at each model's ``log_sigma_min``."""
    return (torch.clamp(run.log_sigma_student, min=student.log_sigma_min),
            torch.clamp(run.log_sigma_teacher, min=teacher.log_sigma_min))


def kl_per_step(run: DistillationPass, student: nn.Module, teacher: nn.Module,
                estimator: str = "closed_form") -> Tensor:
    """Per-step KL terms ``[B, T]`` of one :class:`DistillationPass`; their sum over time
    estimates ``KL(student || teacher)`` in nats per utterance.

    ``closed_form``: :func:`gaussian_kl` of the two per-step Gaussians, both log-scales
    floored at the models' ``log_sigma_min`` (ClariNet's floor: below it the KL has no
    gradient that would push a scale further down). ``monte_carlo``:
    ``[log N(z_t) - log s_S,t] - log N(x_t; mu_T, s_T)`` with the student's exact density of its
    own sample (the teacher's scale is floored by the teacher itself).
    """
    if estimator == "closed_form":
        log_sigma_s, log_sigma_t = floored(run, student, teacher)
        return gaussian_kl(run.mu_student, log_sigma_s, run.mu_teacher, log_sigma_t)
    if estimator == "monte_carlo":
        log_q = standard_normal_log_prob(run.z) - run.log_sigma_student
        return log_q - gaussian_log_prob(run.x, run.mu_teacher, run.log_sigma_teacher)
    raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")


def _check_skip(skip: int, length: int) -> None:
    if not 0 <= skip < length:
        raise ValueError(f"skip={skip} must be in [0, {length}) for {length}-sample signals: "
                         f"use longer segments or a smaller skip")


def kl_divergence(student: nn.Module, teacher: nn.Module, mel: Tensor, z: Tensor | None = None,
                  estimator: str = "closed_form", skip: int = 0) -> Tensor:
    """``KL(student || teacher)`` given ``mel [B, n_mels, F]``, in nats per utterance ``[B]``,
    summed over time steps ``t >= skip``.

    ``z [B, F * hop]`` is the student's noise (drawn from ``N(0, 1)`` when ``None``).
    ``estimator`` is ``"closed_form"`` or ``"monte_carlo"`` (see :func:`kl_per_step`); both
    are unbiased for the same KL. Differentiable with respect to the student (and the teacher).
    """
    run = distillation_pass(student, teacher, mel, z)
    _check_skip(skip, run.x.shape[-1])
    return kl_per_step(run, student, teacher, estimator)[:, skip:].sum(-1)


def freeze(model: nn.Module) -> nn.Module:
    """Parameters without gradients, eval mode; returns ``model``."""
    return model.requires_grad_(False).eval()


class DistillationObjective(nn.Module):
    """The student's training loss against a frozen teacher.

    ``forward(audio [B, T], mel [B, n_mels, T // hop]) -> (loss, metrics)``: the student draws
    ``x`` from fresh noise for ``mel``; per utterance, over time steps ``t >= skip``,

    * ``kl``: the KL estimate (``estimator``) divided by the number of steps, in nats per
      sample, so the loss scale does not depend on the segment length;
    * ``logsigma_reg``: the mean of ``(log s_S - log s_T)^2`` (floored log-scales), weight
      ``lambda_logsigma``;
    * ``stft``: :class:`~vocoder.losses.MultiResolutionSTFTLoss` between ``x`` and the real
      ``audio`` the mel was computed from, weight ``lambda_stft`` (not computed when the
      weight is 0);
    * ``mel``: the mean absolute difference of the log-mel spectrograms of ``x`` and
      ``audio`` through ``features`` (the models' own front end), weight ``lambda_mel`` (off
      at 0). Per mel band rather than per linear-frequency bin, it weighs the low bands, where
      formants and harmonics sit, as the ear and the quality metrics do; the STFT loss's
      log-magnitude mean is dominated by the many bins above 2 kHz.

    ``loss = mean_B(lambda_kl * kl + lambda_logsigma * logsigma_reg) + lambda_stft * stft
    + lambda_mel * mel``. ``lambda_kl`` (default 1) below 1 lets the spectral terms against the
    real audio outweigh a teacher whose own samples lack pitch. Metrics: those four
    (``stft``, ``mel`` only when used), ``kl_total`` (nats per utterance),
    ``student_log_sigma_mean`` and ``teacher_log_sigma_mean``.

    The teacher's parameters are frozen and it stays in eval mode whatever mode the objective
    is put in; gradients still flow through its activations into the student's sample.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, lambda_logsigma: float = 4.0,
                 lambda_stft: float = 1.0, estimator: str = "closed_form", skip: int = 0,
                 stft_resolutions: list | None = None, lambda_mel: float = 0.0,
                 features: nn.Module | None = None, lambda_kl: float = 1.0):
        super().__init__()
        if lambda_kl < 0:
            raise ValueError(f"lambda_kl must be >= 0, got {lambda_kl}")
        if lambda_mel > 0 and features is None:
            raise ValueError("lambda_mel > 0 needs the mel front end (features)")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown KL estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
        if student.hop_length != teacher.hop_length or student.n_mels != teacher.n_mels:
            raise ValueError(f"student (hop {student.hop_length}, {student.n_mels} mels) and "
                             f"teacher (hop {teacher.hop_length}, {teacher.n_mels} mels) must "
                             f"share the mel preset")
        self.student = student
        self.teacher = freeze(teacher)
        self.lambda_kl = float(lambda_kl)
        self.lambda_logsigma = float(lambda_logsigma)
        self.lambda_stft = float(lambda_stft)
        self.estimator = estimator
        self.skip = int(skip)
        self.stft = None
        if self.lambda_stft > 0:
            from vocoder.losses import MultiResolutionSTFTLoss

            self.stft = (MultiResolutionSTFTLoss(stft_resolutions) if stft_resolutions
                         else MultiResolutionSTFTLoss())
        self.lambda_mel = float(lambda_mel)
        # A copy: moving the objective to its device must not move the caller's front end.
        self.features = copy.deepcopy(features) if self.lambda_mel > 0 else None

    def train(self, mode: bool = True) -> DistillationObjective:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, audio: Tensor, mel: Tensor) -> tuple[Tensor, dict[str, float]]:
        run = distillation_pass(self.student, self.teacher, mel, torch.randn_like(audio))
        _check_skip(self.skip, run.x.shape[-1])
        kl_total = kl_per_step(run, self.student, self.teacher,
                               self.estimator)[:, self.skip:].sum(-1)
        kl = kl_total / (run.x.shape[-1] - self.skip)
        log_sigma_s, log_sigma_t = (v[:, self.skip:] for v in floored(run, self.student,
                                                                      self.teacher))
        regulariser = (log_sigma_s - log_sigma_t).square().mean(-1)
        loss = (self.lambda_kl * kl + self.lambda_logsigma * regulariser).mean()
        metrics = {
            "kl": kl.mean(),
            "kl_total": kl_total.mean(),
            "logsigma_reg": regulariser.mean(),
            "student_log_sigma_mean": run.log_sigma_student.mean(),
            "teacher_log_sigma_mean": run.log_sigma_teacher.mean(),
        }
        target = audio.to(run.x.dtype)
        if self.stft is not None:
            stft = self.stft(run.x, target)
            loss = loss + self.lambda_stft * stft
            metrics["stft"] = stft
        if self.features is not None:
            with torch.no_grad():
                target_mel = self.features(target)
            mel = (self.features(run.x) - target_mel).abs().mean()
            loss = loss + self.lambda_mel * mel
            metrics["mel"] = mel
        # One device-to-host copy for all of them (and, under torch.compile, one graph break,
        # at the very end).
        values = torch.stack([v.detach().float() for v in metrics.values()]).tolist()
        return loss, dict(zip(metrics, values, strict=True))


def make_distill_objective(teacher: nn.Module, dcfg: Mapping, features: nn.Module | None = None
                           ) -> Callable[[nn.Module], DistillationObjective]:
    """The trainer's ``make_objective`` for distilling from ``teacher`` with the options of a
    ``distill:`` config block (``lambda_kl``, ``lambda_logsigma``, ``lambda_stft``, ``lambda_mel``,
    ``estimator``, ``skip_receptive_field``, ``skip``, ``stft_resolutions``); ``features`` is
    the mel front end the mel loss uses. With ``skip_receptive_field``
    the first ``teacher.receptive_field`` steps of every segment, where the teacher sees the
    zero padding before the segment rather than real past audio, are left out of the KL."""
    skip = (teacher.receptive_field if dcfg.get("skip_receptive_field", False)
            else int(dcfg.get("skip", 0)))
    resolutions = dcfg.get("stft_resolutions")
    options = dict(
        lambda_kl=float(dcfg.get("lambda_kl", 1.0)),
        lambda_logsigma=float(dcfg.get("lambda_logsigma", 4.0)),
        lambda_stft=float(dcfg.get("lambda_stft", 1.0)),
        estimator=str(dcfg.get("estimator", "closed_form")),
        skip=skip,
        stft_resolutions=[list(r) for r in resolutions] if resolutions else None,
        lambda_mel=float(dcfg.get("lambda_mel", 0.0)),
        features=features,
    )

    def make(student: nn.Module) -> DistillationObjective:
        return DistillationObjective(student, teacher, **options)

    return make
