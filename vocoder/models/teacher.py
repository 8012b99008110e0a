"""The teacher: an autoregressive WaveNet with a Gaussian output, i.e. a Masked
Autoregressive Flow from noise ``z`` to audio ``x``:

    x_t = mu_t(x_<t, c) + sigma_t(x_<t, c) * z_t,   z_t ~ N(0, 1)

Scoring audio is one parallel pass (``z_t = (x_t - mu_t) / sigma_t``); sampling is sequential,
one cached WaveNet step per sample.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vocoder.losses import QUANTISATION_STEP, dequantise, gaussian_log_prob
from vocoder.models.base import Vocoder
from vocoder.models.streams import TeacherStream
from vocoder.nn.baking import bake_wavenet
from vocoder.nn.excitation import make_excitation
from vocoder.nn.incremental import IncrementalStack
from vocoder.nn.wavenet import MelUpsampler, WaveNetStack

# Elements of per-layer conditioning computed ahead of the sampling loop at a time.
_TERMS_BUDGET = 1 << 22
# Captured CUDA-graph samplers, one per teacher (outside the module, so that copying or
# saving a teacher never touches a graph).
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Teacher(Vocoder):
    """WaveNet MAF teacher.

    Architecture keywords (all returned by :meth:`arch_config`):

    * ``n_layers``, ``cycle_length``: residual layers, dilation ``2 ** (i % cycle_length)``;
    * ``residual_channels``, ``gate_channels`` (even; half go through tanh, half through
      sigmoid), ``skip_channels``, ``kernel_size``: the WaveNet widths;
    * ``cond_channels``: channels of the upsampled mel that every layer sees;
    * ``upsample_scales``: stretch factors of the mel upsampler, product ``hop_length``
      (``None``: factored from ``hop_length``, e.g. 256 -> [4, 4, 4, 4]);
    * ``frame_context``: mel frames on each side the upsampler's first convolution sees;
    * ``audio_scale``: a typical amplitude of the audio. The WaveNet works in units of it: it
      reads ``x / audio_scale`` and its outputs ``(m, s)`` give ``mu = audio_scale * m`` and
      ``log_sigma = s + log(audio_scale)``. Speech peaks at 0.1-0.5 of full scale, so unit
      inputs and outputs keep the first and last 1x1 near their initial scale; read raw
      (``audio_scale=1``), the network must first grow its input weights and shrink its
      output ones, which at demo sizes took hundreds of steps before the mean predicted
      anything (validation NLL -1.5 against -3.5 with the scaling, after 300 steps);
    * ``log_sigma_min``: floor of the predicted log standard deviation (in audio units);
    * ``weight_norm``: weight-normalise the WaveNet's convolutions while training;
    * ``nll_beta``: beta-NLL (Seitzer et al., 2022) in training: each sample's negative
      log-likelihood is weighted by ``sigma_t ** (2 * beta)`` (no gradient through the
      weight; weights normalised to mean 1 per batch). The Gaussian NLL's gradient on the mean
      is ``(mu - x) / sigma^2``, so where a target is hard to predict (a glottal pulse) plain
      NLL (beta 0) raises sigma and thereby starves the mean; beta 0.5 leaves it
      ``(mu - x) / sigma`` and beta 1 the squared error's;
    * ``preemphasis``: ``alpha`` of a fixed pre-emphasis ``e_t = x_t - alpha x_(t-1)`` in front
      of the WaveNet, a causal linear layer with unit Jacobian diagonal (log-determinant 0), so
      the model stays an exact MAF of ``x``: the network reads ``e_<t`` and predicts ``e_t``,
      i.e. ``mu_t = alpha x_(t-1) + audio_scale * m_t`` (a one-tap linear-prediction shortcut
      into the mean), and sampling inverts it exactly (``x_t = e_t + alpha x_(t-1)``). It
      flattens the spectral tilt the network would otherwise have to model. 0 disables.
    * ``excitation``: ``None``, or the keywords of an :class:`~vocoder.nn.excitation.Excitation`
      (``sample_rate``, ``fmin``, ``fmax``, ...): the WaveNet then reads, beside ``x_<t``, the
      source ``s_<=t [K]`` (sine and cosine of the fundamental's phase and its harmonics, and
      the voicing; ``K = excitation.source_channels``),
      taken from the audio in training and from the mel at synthesis, so that the mean can
      place each glottal pulse on the phase instead of inventing it. The source is
      conditioning: it never depends on ``x``, and the model stays an exact MAF.
    * ``input_noise``: in training only, the network reads ``x + n`` with ``n ~ N(0,
      input_noise^2)`` (audio units) as its past while the likelihood is still that of ``x``,
      so that it learns to predict from a past as imperfect as its own samples are at
      synthesis. 0 disables; validation (eval mode), sampling and :meth:`log_prob` never
      add noise. Measured on the demo corpus (docs/QUALITY.md, session 11): 0.002-0.003
      improve the teacher's own samples, but kept to the end of training its sigma grows and
      the student distilled from it is noisier (MR-STFT +0.09 per 0.001);
    * ``input_noise_until``: the share of training (``trainer.max_steps``) during which
      ``input_noise`` is applied; after it the teacher trains on its clean past, so that the
      noisy start shapes what it learns and a clean end sharpens its sigma again for
      distillation. 1 (default) keeps the noise to the end. The trainer reports progress
      through :meth:`set_training_progress`; a model trained outside it keeps the noise on.
      Session 12 (docs/QUALITY.md): over 2,000 steps 0.003 until 0.5 kept most of the
      teacher's gain and the student's spectra; over the long recipe's 6,000 the octave
      error came back and distillation from it collapsed once, so the presets leave it off.
    """

    kind = "teacher"

    def __init__(self, n_mels: int, hop_length: int, n_layers: int = 24, cycle_length: int = 8,
                 residual_channels: int = 128, gate_channels: int = 256,
                 skip_channels: int = 128, kernel_size: int = 3, cond_channels: int = 80,
                 upsample_scales: Sequence[int] | None = None, frame_context: int = 1,
                 audio_scale: float = 0.1, log_sigma_min: float = -7.0,
                 weight_norm: bool = False, nll_beta: float = 0.0,
                 preemphasis: float = 0.0, excitation: dict | None = None,
                 input_noise: float = 0.0, input_noise_until: float = 1.0):
        super().__init__(n_mels, hop_length)
        if not input_noise >= 0.0:
            raise ValueError(f"input_noise must be >= 0, got {input_noise}")
        if not 0.0 <= input_noise_until <= 1.0:
            raise ValueError(f"input_noise_until must be in [0, 1], got {input_noise_until}")
        self.input_noise = float(input_noise)
        self.input_noise_until = float(input_noise_until)
        self._progress = 0.0
        if not audio_scale > 0:
            raise ValueError(f"audio_scale must be positive, got {audio_scale}")
        if not 0.0 <= nll_beta <= 1.0:
            raise ValueError(f"nll_beta must be in [0, 1], got {nll_beta}")
        self.nll_beta = float(nll_beta)
        if not 0.0 <= preemphasis < 1.0:
            raise ValueError(f"preemphasis must be in [0, 1), got {preemphasis}")
        self.preemphasis = float(preemphasis)
        self.upsampler = MelUpsampler(n_mels, hop_length, cond_channels, upsample_scales,
                                      frame_context)
        self.excitation = make_excitation(excitation, n_mels, hop_length)
        n_source = self.excitation.source_channels if self.excitation else 0
        self.wavenet = WaveNetStack(
            in_channels=1 + n_source, out_channels=2,
            n_layers=n_layers, cycle_length=cycle_length,
            residual_channels=residual_channels, gate_channels=gate_channels,
            skip_channels=skip_channels, kernel_size=kernel_size, cond_channels=cond_channels,
            weight_norm=weight_norm,
        )
        self.audio_scale = float(audio_scale)
        self.log_sigma_min = float(log_sigma_min)
        self._arch = dict(
            n_layers=n_layers, cycle_length=cycle_length, residual_channels=residual_channels,
            gate_channels=gate_channels, skip_channels=skip_channels, kernel_size=kernel_size,
            cond_channels=cond_channels, upsample_scales=list(self.upsampler.scales),
            frame_context=frame_context, audio_scale=self.audio_scale,
            log_sigma_min=self.log_sigma_min, weight_norm=weight_norm,
            nll_beta=self.nll_beta, preemphasis=self.preemphasis,
            excitation=self.excitation.config() if self.excitation else None,
        )
        if self.input_noise:
            self._arch["input_noise"] = self.input_noise
        if self.input_noise_until != 1.0:
            self._arch["input_noise_until"] = self.input_noise_until

    def arch_config(self) -> dict:
        return dict(self._arch)

    def set_training_progress(self, step: int, max_steps: int) -> None:
        """Called by the trainer before each step: ``step`` of ``max_steps`` are done."""
        self._progress = step / max(int(max_steps), 1)

    def _noise_now(self) -> float:
        """The input noise of this training step (0 in eval mode or after the cut-off)."""
        if not self.training or not self.input_noise:
            return 0.0
        if self.input_noise_until < 1.0 and self._progress >= self.input_noise_until:
            return 0.0
        return self.input_noise

    @property
    def receptive_field(self) -> int:
        """Past samples one output sees: ``mu_t`` depends on ``x[t - receptive_field : t]``."""
        return self.wavenet.receptive_field + (1 if self.preemphasis else 0)

    def _conditioning(self, mel: Tensor, length: int) -> Tensor:
        self.check_mel_shape(mel, length)
        return self.upsampler(mel)

    def forward(self, x: Tensor, mel: Tensor,
                source: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, T]``, ``mel [B, n_mels, T // hop]`` -> ``(mu, log_sigma)``, each ``[B, T]``.

        Position ``t`` sees ``x[:, :t]`` (the network reads ``x`` shifted right by one, zero
        first) and the mel; with excitation also ``source [B, K, T]`` up to ``t``
        (default: :meth:`source` of the mel). ``log_sigma`` is clamped at ``log_sigma_min`` with
        ``torch.clamp``: below the floor its gradient is zero, so the floor cannot be pushed
        through while the mean keeps learning.
        """
        x, mel = self._in_model_dtype(x, mel)
        cond = self._conditioning(mel, x.shape[-1])
        previous = F.pad(x, (1, -1))  # x_(t-1), zero first
        e = x - self.preemphasis * previous if self.preemphasis else x
        shifted = F.pad(e, (1, -1)).unsqueeze(1) * (1.0 / self.audio_scale)
        if self.excitation is not None:
            source = self.source(mel) if source is None else source
            shifted = torch.cat([shifted, source.to(shifted)], dim=1)
        out = self.wavenet(shifted, cond)
        mu = out[:, 0] * self.audio_scale
        if self.preemphasis:
            mu = mu + self.preemphasis * previous
        log_sigma = torch.clamp(out[:, 1] + math.log(self.audio_scale), min=self.log_sigma_min)
        return mu, log_sigma

    def log_prob(self, x: Tensor, mel: Tensor, source: Tensor | None = None) -> Tensor:
        """``log p(x | mel)`` in nats per utterance ``[B]``: the sum over time of
        ``log N(z_t) - log_sigma_t`` with ``z = (x - mu) / sigma`` (with excitation, given the
        ``source``: by default the mel's)."""
        x, mel = self._in_model_dtype(x, mel)
        mu, log_sigma = self(x, mel, source)
        return gaussian_log_prob(x, mu, log_sigma).sum(-1)

    def training_loss(self, audio: Tensor, mel: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Negative log-likelihood in nats per sample of dequantised audio.

        ``audio`` holds 16-bit values as ``k / 32768``; adding ``U(-0.5, 0.5) / 32768`` spreads
        each value over its quantisation bin, so the continuous density is a proper bound for
        the discrete data. Metrics: ``nll`` (nats per sample, of the density over amplitudes in
        [-1, 1], so it can be negative), ``bits_per_sample`` (the implied code length of the
        16-bit integers, ``(nll + ln 32768) / ln 2``) and ``log_sigma_mean``. With ``nll_beta``
        the loss is the beta-weighted NLL (see the class docstring) and ``nll`` stays plain.
        With excitation the source is the audio's own (:meth:`~vocoder.nn.excitation.
        Excitation.analyse`) and the pitch predictor's loss is added (metrics ``pitch_*``).
        """
        x = dequantise(audio)
        source, pitch_loss = None, None
        if self.excitation is not None:
            source, pitch_loss = self.excitation.analyse(audio, mel)
        noise = self._noise_now()
        past = x + noise * torch.randn_like(x) if noise else x
        mu, log_sigma = self(past, mel, source)
        log_p = gaussian_log_prob(x, mu, log_sigma)
        nll = float(-log_p.detach().mean())
        if self.nll_beta:
            weight = torch.exp(2.0 * self.nll_beta * log_sigma.detach())
            loss = -(log_p * weight).sum() / weight.sum()
        else:
            loss = -log_p.mean()
        metrics = {
            "nll": nll,
            "bits_per_sample": (nll - math.log(QUANTISATION_STEP)) / math.log(2),
            "log_sigma_mean": float(log_sigma.detach().mean()),
        }
        if pitch_loss is not None:
            loss = loss + pitch_loss
            metrics.update(self.excitation.last_metrics)
        return loss, metrics

    @torch.no_grad()
    def sample(self, mel: Tensor, z: Tensor | None = None, sigma: float = 1.0,
               cuda_graph: bool | None = None, source: Tensor | None = None) -> Tensor:
        """Generate ``x [B, F * hop]`` from ``mel [B, n_mels, F]``, one sample at a time.

        ``z [B, F * hop]`` is the noise (drawn when ``None``; given, the result is
        deterministic), scaled by the temperature ``sigma``. The mel is upsampled once, and
        every layer's conditioning is projected ahead, one matrix product per chunk of steps
        (for the whole utterance at once it would take ``n_layers * gate_channels`` floats per
        sample, half a gigabyte per second of audio at paper size); each step then runs the
        cached WaveNet (:class:`~vocoder.nn.incremental.IncrementalStack`) on the previous
        sample.

        ``cuda_graph`` (default: on for CUDA inputs) records one chunk's kernel sequence as a
        CUDA graph and replays it for every chunk (see :class:`_SamplingChunks`); the graph
        is kept for further calls with the same batch, device, dtype and unchanged weights.
        With excitation, ``source [B, K, F * hop]`` replaces the mel's own.
        """
        mel = mel.to(next(self.wavenet.parameters()))
        noise = self.noise(mel, z)
        batch, length = noise.shape
        cond = self._conditioning(mel, length)
        if self.excitation is not None:
            source = self.source(mel) if source is None else source.to(noise)
            source = source.permute(2, 0, 1).contiguous()  # time-major [T, B, K]
        if cuda_graph is None:
            cuda_graph = mel.is_cuda
        if cuda_graph and not mel.is_cuda:
            raise ValueError("cuda_graph=True needs a CUDA device")
        chunks = self._sampling_chunks(batch, cuda_graph)
        # Time-major [T, B, 1], so each step's noise and output are [B, 1] views.
        noise = (noise * sigma).t().contiguous().unsqueeze(-1)
        x = torch.empty_like(noise)
        chunks.start()
        for begin in range(0, length, chunks.steps):
            end = min(begin + chunks.steps, length)
            chunks.run(cond[:, :, begin:end], noise[begin:end], x[begin:end],
                       None if source is None else source[begin:end])
        return x.squeeze(-1).t().contiguous()

    def _sampling_chunks(self, batch: int, cuda_graph: bool) -> _SamplingChunks:
        if not cuda_graph:
            return _SamplingChunks(self, batch)
        params = list(self.parameters())
        key = (batch, params[0].device, params[0].dtype, self.audio_scale,
               tuple((p.data_ptr(), p._version) for p in params))
        cached = _GRAPHS.get(self)
        # The cache holds the parameters themselves, so none of them can be freed and a
        # data pointer reused while it lives: identity, address and version pin the weights.
        if (cached is None or cached[0] != key
                or any(a is not b for a, b in zip(cached[1], params, strict=True))):
            try:
                chunks = _SamplingChunks(self, batch, capture=True)
            except RuntimeError as e:
                # Sampling must not fail for want of a graph: warn once per teacher and keep
                # the eager chunks (the same steps, launched one kernel at a time).
                warnings.warn(f"teacher sampling: CUDA graph capture failed ({e}); "
                              f"sampling without a graph", RuntimeWarning, stacklevel=3)
                chunks = _SamplingChunks(self, batch)
            cached = (key, params, chunks)
            _GRAPHS[self] = cached
        return cached[2]

    @torch.no_grad()
    def _sample_naive(self, mel: Tensor, z: Tensor) -> Tensor:
        """Reference sampler for tests: the full parallel forward over the whole sequence at
        every step (quadratic time)."""
        z = self.noise(mel, z)
        x = torch.zeros_like(z)
        for t in range(x.shape[-1]):
            mu, log_sigma = self(x, mel)
            x[:, t] = mu[:, t] + torch.exp(log_sigma[:, t]) * z[:, t]
        return x

    def synthesize(self, mel: Tensor, sigma: float | None = None,
                   z: Tensor | None = None, source: Tensor | None = None) -> Tensor:
        """``mel [B, n_mels, F]`` -> audio ``[B, F * hop]`` from noise ``z`` (drawn when
        ``None``) times ``sigma`` (default 1.0), by cached sampling (with excitation, given
        ``source``: by default the mel's)."""
        return self.sample(mel, z=z, sigma=1.0 if sigma is None else sigma, source=source)

    def stream(self, sigma: float | None = None) -> TeacherStream:
        """Exact streaming synthesis (:class:`~vocoder.models.streams.TeacherStream`): the
        cached sampler continued over pushed mel chunks."""
        return TeacherStream(self, 1.0 if sigma is None else sigma)

    def prepare_for_inference(self) -> Teacher:
        self.wavenet.remove_weight_norm()
        _GRAPHS.pop(self, None)
        return super().prepare_for_inference()


class _SamplingChunks:
    """The teacher's sampling loop over chunks of ``steps`` samples, through static buffers.

    A chunk reads the per-layer conditioning ``terms [steps, n_layers, B, G]`` and the scaled
    noise ``noise [steps, B, 1]`` and writes ``x [steps, B, 1]``; the last sample is carried
    into the next chunk in ``previous [B, 1]``. ``steps`` is a multiple of the stepper's
    :attr:`~vocoder.nn.incremental.IncrementalStack.period`, so every chunk starts at the same
    phase of all tap buffers and issues the same kernels on the same addresses: with
    ``capture=True`` (CUDA) one chunk is recorded as a CUDA graph and each later chunk is one
    replay, which removes the per-kernel launch cost (about 5 kernels per layer per sample).
    Without capture the same Python runs eagerly, and a short last chunk runs only its own
    steps.
    """

    def __init__(self, teacher: Teacher, batch: int, capture: bool = False):
        # No reference to the teacher is kept: the graph cache is keyed weakly by it.
        self.log_sigma_min = teacher.log_sigma_min
        self.stepper = self._stepper(teacher, batch)
        wavenet = teacher.wavenet
        period = self.stepper.period
        per_step = batch * wavenet.n_layers * wavenet.gate_channels
        # A graph of about 256 steps (a few ten thousand kernels) is quick to capture; eager
        # chunks only bound the memory of the projected conditioning.
        periods = (-(-256 // period) if capture
                   else max(1, _TERMS_BUDGET // (per_step * period)))
        self.steps = period * periods
        ref = next(wavenet.parameters())
        self.terms = torch.zeros(self.steps, wavenet.n_layers, batch, wavenet.gate_channels,
                                 device=ref.device, dtype=ref.dtype)
        self.noise = torch.zeros(self.steps, batch, 1, device=ref.device, dtype=ref.dtype)
        self.x = torch.zeros_like(self.noise)
        self.preemphasis = teacher.preemphasis
        # The network's input: x itself, or its pre-emphasised e (then x_t = e_t + a x_(t-1)).
        self.e = torch.zeros_like(self.noise) if self.preemphasis else self.x
        # With excitation, step t reads (e_(t-1), source_t) from row t of `inputs`.
        n_source = wavenet.in_channels - 1
        self.inputs = (torch.zeros(self.steps, batch, 1 + n_source, device=ref.device,
                                   dtype=ref.dtype) if n_source else None)
        self.previous = torch.zeros_like(self.noise[0])
        self.previous_x = torch.zeros_like(self.previous)
        self.scale = torch.zeros_like(self.previous)
        self.graph = None
        if capture:
            self._capture()

    @staticmethod
    def _stepper(teacher: Teacher, batch: int) -> IncrementalStack:
        # The audio-unit scaling of forward() baked into the input and output matrices.
        scale = teacher.audio_scale
        n_source = teacher.wavenet.in_channels - 1  # source channels are read unscaled
        baked = bake_wavenet(teacher.wavenet, input_scale=[1.0 / scale] + [1.0] * n_source,
                             output_scale=(scale, 1.0), output_shift=(0.0, math.log(scale)),
                             fold_first_layer=False)
        return IncrementalStack(baked, batch)

    def _steps(self, n: int) -> None:
        stepper, log_sigma_min, scale = self.stepper, self.log_sigma_min, self.scale
        mu, log_sigma = stepper.output[:, 0:1], stepper.output[:, 1:2]
        previous, previous_x, alpha = self.previous, self.previous_x, self.preemphasis
        inputs = [None] * n if self.inputs is None else self.inputs[:n]
        for terms_t, noise_t, e_t, x_t, input_t in zip(self.terms[:n], self.noise[:n],
                                                       self.e[:n], self.x[:n], inputs,
                                                       strict=True):
            if input_t is None:
                stepper.step(previous, terms_t)
            else:
                input_t[:, :1].copy_(previous)
                stepper.step(input_t, terms_t)
            torch.clamp(log_sigma, min=log_sigma_min, out=scale)
            scale.exp_()
            torch.addcmul(mu, scale, noise_t, out=e_t)
            if alpha:  # undo the pre-emphasis: x_t = e_t + alpha x_(t-1)
                torch.add(e_t, previous_x, alpha=alpha, out=x_t)
                previous_x = x_t
            previous = e_t
        self.previous.copy_(previous)
        self.previous_x.copy_(previous_x)

    def _capture(self) -> None:
        # Warm up (cuBLAS handles and workspaces) on a side stream, as CUDA graphs require,
        # then record one chunk from a clean state.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._steps(self.steps)
        torch.cuda.current_stream().wait_stream(stream)
        self.start()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._steps(self.steps)
        self.start()

    def start(self) -> None:
        """Back to time 0: zero history and previous sample."""
        self.stepper.reset()
        self.previous.zero_()
        self.previous_x.zero_()

    def run(self, cond: Tensor, noise: Tensor, x: Tensor, source: Tensor | None = None) -> None:
        """The next chunk: ``cond [B, C_cond, n]`` upsampled mel, ``noise [n, B, 1]``, output
        into ``x [n, B, 1]``, ``n <= steps`` (shorter only for the last chunk); ``source
        [n, B, K]`` (time-major) for a teacher with excitation."""
        n = noise.shape[0]
        if (source is None) != (self.inputs is None):
            raise ValueError("source must be given exactly when the teacher has excitation")
        if source is not None:
            self.inputs[:n, :, 1:].copy_(source)
        self.stepper.conditioning_terms(cond, out=self.terms[:n])
        self.noise[:n].copy_(noise)
        if self.graph is None:
            self._steps(n)
        else:
            # The whole chunk replays; steps past n only fill the unused tail.
            self.graph.replay()
        x.copy_(self.x[:n])
