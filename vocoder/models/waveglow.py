"""WaveGlow (Prenger, Valle & Catanzaro, 2019), laid out like NVIDIA's published model so that
its weights import exactly (see :mod:`vocoder.waveglow_import`).

Shapes: audio ``[B, T]`` with ``T`` a multiple of ``n_group``; mels ``[B, n_mels, F]`` with
``(F - 1) * hop + upsample_kernel >= T`` (``T = F * hop`` for training segments and synthesis).

The flow, audio -> z:

1. A learned ``ConvTranspose1d(n_mels, n_mels, upsample_kernel, stride=hop)`` upsamples the mel
   to the sample rate; the output is cut to the first ``T`` samples.
2. Squeeze: audio becomes ``[B, n_group, T / n_group]``, channel ``j`` of group position ``p``
   being sample ``p * n_group + j``; the upsampled mel becomes ``[B, n_mels * n_group,
   T / n_group]``, channel ``m * n_group + j`` being band ``m`` at sample ``p * n_group + j``.
3. For ``k = 0 .. n_flows - 1``: when ``k > 0`` and ``k % n_early_every == 0``, the first
   ``n_early_size`` channels leave as an early output; then an invertible 1x1 convolution and
   an affine coupling act on the remaining channels.
4. The early outputs (in the order they left) and the final channels are concatenated to
   ``[B, n_group, T / n_group]`` and un-squeezed with the inverse of step 2, so that
   ``z[:, p * n_group + c]`` is channel ``c`` of group position ``p``. This is the layout
   NVIDIA's ``infer`` reads its noise in, so the same ``z`` gives the same audio.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from vocoder.flows.coupling import AffineCoupling
from vocoder.flows.invconv import INVCONVS, make_invconv
from vocoder.losses import QUANTISATION_STEP, dequantise
from vocoder.models.base import Vocoder
from vocoder.models.streams import ChunkedStream
from vocoder.nn.excitation import make_excitation


class WaveGlow(Vocoder):
    """WaveGlow flow vocoder; trained by maximum likelihood, sampled with ``sigma`` ~ 0.6.

    ``audio_scale`` (0.1 here, 1.0 for NVIDIA's published models) divides the audio before the
    flow and multiplies it back after the inverse, so the couplings see unit-scale signals as
    the teacher's and student's WaveNets do; its log enters the log-determinant.

    ``excitation`` (``None``, or the keywords of an :class:`~vocoder.nn.excitation.Excitation`)
    adds the excitation source ``[K, T]`` (sin/cos of the fundamental's phase and of its
    harmonics, and the voicing; ``K = excitation.source_channels``),
    squeezed like the mel, to every coupling's conditioning: the audio's own in training, the
    mel's at synthesis.
    """

    kind = "waveglow"

    def __init__(self, n_mels: int, hop_length: int, n_flows: int = 12, n_group: int = 8,
                 n_early_every: int = 4, n_early_size: int = 2, n_layers: int = 8,
                 n_channels: int = 256, kernel_size: int = 3, invconv: str = "plain",
                 upsample_kernel: int | None = None, sigma: float = 0.6,
                 train_sigma: float = 1.0, weight_norm: bool = True,
                 audio_scale: float = 0.1, excitation: dict | None = None):
        super().__init__(n_mels, hop_length)
        if not audio_scale > 0:
            raise ValueError(f"audio_scale must be positive, got {audio_scale}")
        upsample_kernel = 4 * hop_length if upsample_kernel is None else int(upsample_kernel)
        if n_group < 2 or n_group % 2 or hop_length % n_group:
            raise ValueError(f"n_group must be even and divide hop_length {hop_length}, "
                             f"got {n_group}")
        if n_early_every < 1 or n_early_size < 0 or n_early_size % 2:
            raise ValueError("n_early_every must be >= 1 and n_early_size even and >= 0")
        if upsample_kernel < hop_length:
            raise ValueError(f"upsample_kernel {upsample_kernel} is shorter than the hop "
                             f"{hop_length}")
        if invconv not in INVCONVS:
            raise ValueError(f"unknown invconv {invconv!r}; known: {', '.join(INVCONVS)}")
        self.n_flows, self.n_group = n_flows, n_group
        self.n_early_every, self.n_early_size = n_early_every, n_early_size
        self.n_layers, self.n_channels, self.kernel_size = n_layers, n_channels, kernel_size
        self.invconv, self.upsample_kernel = invconv, upsample_kernel
        self.sigma, self.train_sigma, self.weight_norm = sigma, train_sigma, weight_norm
        self.audio_scale = float(audio_scale)

        self.flow_channels: list[int] = []
        remaining = n_group
        for k in range(n_flows):
            if self._emits_early(k):
                remaining -= n_early_size
            if remaining < 2:
                raise ValueError(f"early outputs leave {remaining} channels at flow {k}; "
                                 "reduce n_early_size or raise n_early_every")
            self.flow_channels.append(remaining)

        self.upsample = nn.ConvTranspose1d(n_mels, n_mels, upsample_kernel, stride=hop_length)
        self.excitation = make_excitation(excitation, n_mels, hop_length)
        cond_channels = ((n_mels + (self.excitation.source_channels if self.excitation else 0))
                         * n_group)
        self.invconvs = nn.ModuleList(make_invconv(invconv, c) for c in self.flow_channels)
        self.couplings = nn.ModuleList(
            AffineCoupling(c, cond_channels, n_layers, n_channels, kernel_size, weight_norm)
            for c in self.flow_channels
        )

    def arch_config(self) -> dict:
        return dict(n_flows=self.n_flows, n_group=self.n_group,
                    n_early_every=self.n_early_every, n_early_size=self.n_early_size,
                    n_layers=self.n_layers, n_channels=self.n_channels,
                    kernel_size=self.kernel_size, invconv=self.invconv,
                    upsample_kernel=self.upsample_kernel, sigma=self.sigma,
                    train_sigma=self.train_sigma, weight_norm=self.weight_norm,
                    audio_scale=self.audio_scale,
                    excitation=self.excitation.config() if self.excitation else None)

    @property
    def coupling_reach(self) -> int:
        """Audio samples on each side of a sample that one coupling's shift and scale are
        guaranteed to see: its WN reaches ``(kernel_size - 1) / 2 * (2 ** n_layers - 1)``
        squeezed steps of ``n_group`` samples each way (a step's own samples aside)."""
        return (self.kernel_size - 1) // 2 * (2 ** self.n_layers - 1) * self.n_group

    def _emits_early(self, k: int) -> bool:
        return self.n_early_size > 0 and k > 0 and k % self.n_early_every == 0

    @property
    def _dtype(self) -> torch.dtype:
        return self.upsample.weight.dtype

    def conditioning(self, mel: Tensor, n_samples: int, source: Tensor | None = None) -> Tensor:
        """``mel [B, n_mels, F]`` -> squeezed conditioning
        ``[B, n_mels * n_group, T / n_group]``; with excitation the squeezed ``source [B, K,
        T]`` (default: the mel's) follows, ``[B, (n_mels + K) * n_group, T / n_group]``."""
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"expected a mel [B, {self.n_mels}, frames], got {tuple(mel.shape)}")
        mel = mel.to(self._dtype)
        if mel.is_cuda or torch.compiler.is_compiling():
            up = self.upsample(mel)
        else:
            # oneDNN builds a new transposed-convolution kernel for every input length: 1.5-2.8
            # s per new utterance length for the 1024-tap upsampler on one core, against
            # 0.04 s for 13 frames without it, and no slower in steady state (BENCHMARKS.md).
            with warnings.catch_warnings():
                # flags() warns about TF32 on Intel GPUs whenever it sets anything.
                warnings.simplefilter("ignore", UserWarning)
                with torch.backends.mkldnn.flags(enabled=False):
                    up = self.upsample(mel)
        if up.shape[-1] < n_samples:
            raise ValueError(f"{mel.shape[-1]} mel frames cover {up.shape[-1]} samples, "
                             f"fewer than the {n_samples} asked for")
        up = up[..., :n_samples]
        if self.excitation is not None:
            source = self.source(mel) if source is None else source
            up = torch.cat([up, source[..., :n_samples].to(up)], dim=1)
        batch, channels, g = up.shape[0], up.shape[1], self.n_group
        up = up.reshape(batch, channels, n_samples // g, g)
        return up.transpose(2, 3).reshape(batch, channels * g, n_samples // g)

    def _squeeze(self, signal: Tensor) -> Tensor:
        """``[B, T]`` -> ``[B, n_group, T / n_group]``."""
        if signal.dim() != 2 or signal.shape[1] % self.n_group:
            raise ValueError(f"expected [B, T] with T a multiple of {self.n_group}, "
                             f"got {tuple(signal.shape)}")
        batch, length = signal.shape
        return signal.to(self._dtype).reshape(batch, length // self.n_group, self.n_group) \
            .transpose(1, 2)

    @staticmethod
    def _unsqueeze(x: Tensor) -> Tensor:
        """``[B, n_group, T / n_group]`` -> ``[B, T]``."""
        return x.transpose(1, 2).reshape(x.shape[0], -1)

    def encode(self, audio: Tensor, mel: Tensor,
               source: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``audio [B, T]`` -> ``(z [B, T], log_det [B])``: the flow's latent (layout in the
        module docstring) and ``log|det dz/daudio|`` in nats (with excitation, given
        ``source``, by default the mel's)."""
        x = self._squeeze(audio) * (1.0 / self.audio_scale)
        cond = self.conditioning(mel, audio.shape[1], source)
        early, log_det = [], -audio.shape[1] * math.log(self.audio_scale)
        for k, (invconv, coupling) in enumerate(zip(self.invconvs, self.couplings,
                                                    strict=True)):
            if self._emits_early(k):
                early.append(x[:, :self.n_early_size])
                x = x[:, self.n_early_size:]
            x, ld_w = invconv(x)
            x, ld_s = coupling(x, cond)
            log_det = log_det + ld_w + ld_s
        return self._unsqueeze(torch.cat([*early, x], dim=1)), log_det

    def decode(self, z: Tensor, mel: Tensor, source: Tensor | None = None) -> Tensor:
        """``z [B, T]`` -> audio ``[B, T]``, the exact inverse of :meth:`encode`."""
        zs = self._squeeze(z)
        cond = self.conditioning(mel, z.shape[1], source)
        start = self.n_group - self.flow_channels[-1]
        x = zs[:, start:]
        for k in reversed(range(self.n_flows)):
            x = self.couplings[k].inverse(x, cond)
            x = self.invconvs[k].inverse(x)
            if self._emits_early(k):
                start -= self.n_early_size
                x = torch.cat([zs[:, start:start + self.n_early_size], x], dim=1)
        return self._unsqueeze(x) * self.audio_scale

    def log_prob(self, audio: Tensor, mel: Tensor, sigma: float = 1.0,
                 source: Tensor | None = None) -> Tensor:
        """``log p(audio | mel)`` in nats per utterance ``[B]``, with ``z ~ N(0, sigma^2)``
        (with excitation, given ``source``, by default the mel's)."""
        z, log_det = self.encode(audio, mel, source)
        z = z.to(log_det.dtype)
        n = z.shape[1]
        log_norm = n * (math.log(sigma) + 0.5 * math.log(2 * math.pi))
        return -0.5 * (z / sigma).square().sum(1) - log_norm + log_det

    def training_loss(self, audio: Tensor, mel: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Negative log-likelihood in nats per sample (``sigma = train_sigma``, 1.0 as
        published) of the audio dequantised by :func:`~vocoder.losses.dequantise`.

        Metrics: ``nll`` (nats per sample; NVIDIA's printed loss leaves out the constant
        ``0.5 * ln(2 pi)`` = 0.919) and ``bits_per_sample``, the code length of the 16-bit
        samples that this bounds (``nll / ln 2 + 15``; 16 would be a uniform code). With
        excitation the source is the audio's own and the pitch predictor's loss is added
        (metrics ``pitch_*``).
        """
        dequantised = dequantise(audio)
        source, pitch_loss = None, None
        if self.excitation is not None:
            source, pitch_loss = self.excitation.analyse(audio, mel)
        nll = -(self.log_prob(dequantised, mel, self.train_sigma, source)
                / audio.shape[1]).mean()
        value = float(nll.detach())
        bits = (value - math.log(QUANTISATION_STEP)) / math.log(2)
        metrics = {"nll": value, "bits_per_sample": bits}
        if pitch_loss is None:
            return nll, metrics
        metrics.update(self.excitation.last_metrics)
        return nll + pitch_loss, metrics

    @torch.no_grad()
    def synthesize(self, mel: Tensor, sigma: float | None = None,
                   z: Tensor | None = None, source: Tensor | None = None) -> Tensor:
        """``mel [B, n_mels, F]`` -> audio ``[B, F * hop]`` from noise ``z`` (standard normal,
        drawn when ``None``; layout in the module docstring) times ``sigma`` (default: the
        model's, 0.6); with excitation, given ``source`` (default: the mel's)."""
        sigma = self.sigma if sigma is None else float(sigma)
        mel = mel.to(self._dtype)
        return self.decode(self.noise(mel, z) * sigma, mel, source)

    def stream(self, sigma: float | None = None, context_frames: int = 8) -> ChunkedStream:
        """Chunked synthesis with ``context_frames`` of mel on each side of every chunk
        (:class:`~vocoder.models.streams.ChunkedStream`): WaveGlow is not causal, so the
        seams are close to, not equal to, whole-utterance synthesis."""
        return ChunkedStream(self, self.sigma if sigma is None else sigma, context_frames)

    def prepare_for_inference(self) -> WaveGlow:
        """Remove weight norm, fold biases, each ``end`` conv and each first WN layer (through
        ``start``) into cheaper layers, and cache every 1x1 inverse. Idempotent; changes the
        state dict's layout (save before)."""
        for coupling in self.couplings:
            coupling.net.fuse_for_inference()
        for invconv in self.invconvs:
            invconv.prepare_for_inference()
        return super().prepare_for_inference()
