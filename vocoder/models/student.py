"""The student: a stack of inverse autoregressive flows (IAF) from noise ``z`` to audio ``x``.

Flow ``k`` reads the previous flow's output ``z^(k-1)`` (``z^0 = z``) shifted right by one
sample, so position ``t`` sees only ``z^(k-1)_<t``::

    z^k_t = z^(k-1)_t * sigma^k_t + mu^k_t,   (mu^k_t, log sigma^k_t) = WaveNet_k(z^(k-1)_<t, c)

Every flow is affine in its input given the past, so the whole chain is one affine map per
step: ``x_t = mu_tot_t + sigma_tot_t * z_t`` with ``log sigma_tot = sum_k log sigma^k`` and
``mu_tot`` composed flow by flow (``mu_tot^k = mu_tot^(k-1) * sigma^k + mu^k``). Both totals
depend on ``z_<t`` only, so given the past ``x_t`` is Gaussian and the student knows the
density of its own samples exactly. Sampling is one parallel pass, with no loop over time.

Training runs the flows as ordinary modules (:meth:`Student.forward`). Synthesis bakes them
(:func:`~vocoder.nn.baking.bake_wavenet`) and runs them as
:class:`~vocoder.nn.parallel.ParallelStack`, the same arithmetic laid out for speed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vocoder.errors import VocoderError
from vocoder.losses import standard_normal_log_prob
from vocoder.models.base import Vocoder
from vocoder.models.streams import StudentStream
from vocoder.nn.baking import bake_wavenet
from vocoder.nn.excitation import make_excitation
from vocoder.nn.parallel import ParallelStack, ParallelWork
from vocoder.nn.wavenet import MelUpsampler, WaveNetStack


class Student(Vocoder):
    """IAF student of probability density distillation.

    Architecture keywords (all returned by :meth:`arch_config`):

    * ``flow_layers``: residual layers of each flow's WaveNet, one entry per flow (Parallel
      WaveNet: ``[10, 10, 10, 30]``; ClariNet: six flows of 10);
    * ``cycle_length``: dilation of layer ``i`` is ``2 ** (i % cycle_length)``;
    * ``residual_channels``, ``gate_channels`` (even), ``skip_channels``, ``kernel_size``;
    * ``cond_channels``: channels of the upsampled mel, computed once and shared by all flows;
    * ``upsample_scales``, ``frame_context``: the mel upsampler (see
      :class:`~vocoder.nn.wavenet.MelUpsampler`);
    * ``audio_scale``: the flows work in units of this typical audio amplitude, as the
      teacher's WaveNet does: they map unit noise to ``x / audio_scale``, and the student's
      ``x``, ``mu_tot`` are that times ``audio_scale`` (``log_sigma_tot`` gains
      ``log(audio_scale)``), so every flow reads and writes unit-scale signals;
    * ``log_sigma_min``: floor of every flow's log-scale, and the floor at which distillation
      clamps the total log-scale;
    * ``log_sigma_init``: the flows' total log-scale at initialisation, spread evenly over
      their output biases (the last 1x1 of each flow starts at zero, so every flow starts as
      ``z -> z * exp(log_sigma_init / K)``: the identity for 0.0, and the student as
      ``x = audio_scale * z``);
    * ``weight_norm``: weight-normalise the WaveNets while training (removed for inference);
    * ``excitation``: ``None``, or the keywords of an :class:`~vocoder.nn.excitation.Excitation`:
      every flow then also reads the source ``s_<=t [3]`` that the mel implies (the phase of
      the fundamental and the voicing), so the flows can put pulses on a given phase instead
      of building a pulse train from noise. Distillation gives the student its teacher's
      excitation (pitch predictor included), so both see the same source.
    """

    kind = "student"

    def __init__(self, n_mels: int, hop_length: int,
                 flow_layers: Sequence[int] = (10, 10, 10, 30), cycle_length: int = 10,
                 residual_channels: int = 64, gate_channels: int = 128, skip_channels: int = 64,
                 kernel_size: int = 3, cond_channels: int = 80,
                 upsample_scales: Sequence[int] | None = None, frame_context: int = 1,
                 audio_scale: float = 0.1, log_sigma_min: float = -7.0,
                 log_sigma_init: float = 0.0, weight_norm: bool = False,
                 excitation: dict | None = None):
        super().__init__(n_mels, hop_length)
        if not audio_scale > 0:
            raise ValueError(f"audio_scale must be positive, got {audio_scale}")
        flow_layers = [int(n) for n in flow_layers]
        if not flow_layers or min(flow_layers) < 1:
            raise ValueError(f"flow_layers must list positive depths, got {flow_layers}")
        self.upsampler = MelUpsampler(n_mels, hop_length, cond_channels, upsample_scales,
                                      frame_context)
        self.excitation = make_excitation(excitation, n_mels, hop_length)
        n_source = self.excitation.source_channels if self.excitation else 0
        # A source with harmonics starts with the 3-channel source's weight on the first layer
        # (its 2 H + 1 channels each at 1 / sqrt(H)): at full weight the flows' hidden units
        # start out dominated by the source, not the noise, and distillation began badly (KL
        # 1.2 at step 200 with 8 harmonics against 0.4 with one; 16 did not recover by 400).
        source_gain = 1.0 / math.sqrt(self.excitation.harmonics) if self.excitation else 1.0
        self.flows = nn.ModuleList(
            WaveNetStack(
                in_channels=1 + n_source, out_channels=2, n_layers=n, cycle_length=cycle_length,
                residual_channels=residual_channels, gate_channels=gate_channels,
                skip_channels=skip_channels, kernel_size=kernel_size,
                cond_channels=cond_channels, weight_norm=weight_norm, zero_init_output=True,
                input_init_gains=[1.0] + [source_gain] * n_source,
            )
            for n in flow_layers
        )
        with torch.no_grad():
            for flow in self.flows:
                flow.head[-1].bias[1] = float(log_sigma_init) / len(flow_layers)
        self.audio_scale = float(audio_scale)
        self.log_sigma_min = float(log_sigma_min)
        self._arch = dict(
            flow_layers=flow_layers, cycle_length=cycle_length,
            residual_channels=residual_channels, gate_channels=gate_channels,
            skip_channels=skip_channels, kernel_size=kernel_size, cond_channels=cond_channels,
            upsample_scales=list(self.upsampler.scales), frame_context=frame_context,
            audio_scale=self.audio_scale, log_sigma_min=self.log_sigma_min,
            log_sigma_init=float(log_sigma_init),
            weight_norm=weight_norm,
            excitation=self.excitation.config() if self.excitation else None,
        )
        self._baked: tuple[tuple, list[ParallelStack]] | None = None

    def arch_config(self) -> dict:
        return dict(self._arch)

    @property
    def flow_reach(self) -> int:
        """Past samples every flow sees (the smallest of their WaveNets' receptive fields): to
        place a glottal pulse one period after the last, a flow must see the last one, so this
        should span several periods of the lowest F0 of the data."""
        return min(flow.receptive_field for flow in self.flows)

    @property
    def receptive_field(self) -> int:
        """Past noise samples one output sees: ``mu_tot_t`` depends on
        ``z[t - receptive_field : t]`` (each flow adds its WaveNet's span)."""
        return sum(flow.receptive_field for flow in self.flows)

    def _conditioning(self, mel: Tensor, length: int) -> Tensor:
        self.check_mel_shape(mel, length)
        return self.upsampler(mel)

    def _flow_step(self, mu_tot: Tensor, log_sigma_tot: Tensor, z: Tensor,
                   out: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Fold one flow's ``(mu, log_sigma)`` (each ``[B, T]``, log sigma not yet floored)
        into the totals; returns ``(z^k, mu_tot, log_sigma_tot)``."""
        mu, log_sigma = out
        log_sigma = torch.clamp(log_sigma, min=self.log_sigma_min)
        mu_tot = torch.addcmul(mu, mu_tot, torch.exp(log_sigma))
        log_sigma_tot = log_sigma_tot + log_sigma
        return torch.addcmul(mu_tot, torch.exp(log_sigma_tot), z), mu_tot, log_sigma_tot

    def forward(self, z: Tensor, mel: Tensor,
                source: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``z [B, T]``, ``mel [B, n_mels, T // hop]`` -> ``(x, mu_tot, log_sigma_tot)``, each
        ``[B, T]``, with ``x = mu_tot + exp(log_sigma_tot) * z``.

        ``mu_tot[:, t]`` and ``log_sigma_tot[:, t]`` depend only on ``z[:, :t]`` and the mel
        (with excitation, also on ``source [B, K, T]``, by default :meth:`source` of the mel).
        Each flow's output is kept in ``z``'s dtype, so under autocast the WaveNets run in low
        precision while the composition of the flows stays in float32.
        """
        z, mel = self._in_model_dtype(z, mel)
        cond = self._conditioning(mel, z.shape[-1])
        if self.excitation is not None:
            source = (self.source(mel) if source is None else source).to(z.dtype)
        mu_tot = torch.zeros_like(z)
        log_sigma_tot = torch.zeros_like(z)
        h = z
        for flow in self.flows:
            inputs = F.pad(h, (1, -1)).unsqueeze(1)
            if self.excitation is not None:
                inputs = torch.cat([inputs, source], dim=1)
            out = flow(inputs, cond).to(z.dtype)
            h, mu_tot, log_sigma_tot = self._flow_step(mu_tot, log_sigma_tot, z,
                                                       out.unbind(1))
        scale = self.audio_scale
        return h * scale, mu_tot * scale, log_sigma_tot + math.log(scale)

    def _parallel_flows(self, device: torch.device, dtype: torch.dtype) -> list[ParallelStack]:
        # Baked once per set of weights: any in-place update, load or move changes the key.
        key = (device, dtype) + tuple((p.data_ptr(), p._version) for p in self.parameters())
        if self._baked is None or self._baked[0] != key:
            self._baked = (key, [ParallelStack(bake_wavenet(flow, device, dtype))
                                 for flow in self.flows])
        return self._baked[1]

    def sample(self, mel: Tensor, z: Tensor | None = None, sigma: float = 1.0,
               source: Tensor | None = None) -> Tensor:
        """Generate ``x [B, F * hop]`` from ``mel [B, n_mels, F]`` in one parallel pass.

        ``z [B, F * hop]`` is the noise (drawn when ``None``; given, the result is
        deterministic), scaled by the temperature ``sigma``. The result is :meth:`forward`'s
        ``x`` up to rounding, computed by the baked flows
        (:class:`~vocoder.nn.parallel.ParallelStack`). With excitation, ``source [B, K,
        F * hop]`` replaces the mel's own (a piece of a longer utterance's, say).
        """
        # Inference mode is a little faster eagerly (no version counters); torch.compile cannot
        # trace through it and gets no_grad.
        context = torch.no_grad if torch.compiler.is_compiling() else torch.inference_mode
        with context():
            return self._sample(mel, z, sigma, source)

    def _sample(self, mel: Tensor, z: Tensor | None, sigma: float,
                source: Tensor | None) -> Tensor:
        weight = next(self.flows[0].parameters())
        mel = mel.to(weight)
        z = self.noise(mel, z) * sigma
        if torch.compiler.is_compiling():
            # Under torch.compile, the module forward: the baked flows' in-place ``out=``
            # products into strided views are not traceable, and dynamo would run them
            # eagerly. The forward does more MACs (the mel projected per sample) but is one
            # graph for the compiler to fuse.
            return self(z, mel, source)[0]
        flows = self._parallel_flows(weight.device, weight.dtype)
        if self.excitation is not None:
            source = (self.source(mel) if source is None else source).to(z)
        work = ParallelWork(self.upsampler, flows, mel, source=source)
        mu_tot = torch.zeros_like(z)
        log_sigma_tot = torch.zeros_like(z)
        h = z
        for flow in flows:
            h, mu_tot, log_sigma_tot = self._flow_step(mu_tot, log_sigma_tot, z,
                                                       flow(h, work).unbind(-1))
        return h.mul_(self.audio_scale)

    def log_prob_of_sample(self, z: Tensor, mel: Tensor,
                           source: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The sample ``x [B, T]`` that noise ``z [B, T]`` maps to, and its exact log-density
        under the student (``z ~ N(0, 1)``) in nats per utterance ``[B]``:
        ``sum_t log N(z_t; 0, 1) - log_sigma_tot_t`` (the Jacobian ``dx/dz`` is triangular with
        diagonal ``exp(log_sigma_tot)``)."""
        x, _, log_sigma_tot = self(z, mel, source)
        log_q = (standard_normal_log_prob(z) - log_sigma_tot).sum(-1)
        return x, log_q

    def training_loss(self, audio: Tensor, mel: Tensor) -> tuple[Tensor, dict[str, float]]:
        raise VocoderError("the student is trained by distillation from a teacher "
                           "(vocoder.distill.DistillationObjective, vocoder-distill)")

    def synthesize(self, mel: Tensor, sigma: float | None = None,
                   z: Tensor | None = None, source: Tensor | None = None) -> Tensor:
        """``mel [B, n_mels, F]`` -> audio ``[B, F * hop]`` in one parallel pass from noise
        ``z`` (drawn when ``None``) times ``sigma`` (default 1.0); with excitation, given
        ``source`` (by default the mel's)."""
        return self.sample(mel, z=z, sigma=1.0 if sigma is None else sigma, source=source)

    def stream(self, sigma: float | None = None) -> StudentStream:
        """Exact streaming synthesis (:class:`~vocoder.models.streams.StudentStream`): pushed
        mel chunks give, concatenated, :meth:`synthesize` of the whole mel with the same
        noise."""
        return StudentStream(self, 1.0 if sigma is None else sigma)

    def prepare_for_inference(self) -> Student:
        for flow in self.flows:
            flow.remove_weight_norm()
        return super().prepare_for_inference()
