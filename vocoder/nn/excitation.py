"""An explicit excitation cue: the phase of the fundamental, fed to a model as conditioning.

Shapes: ``B`` batch, ``T`` samples, ``F`` mel frames (``T = F * hop``; frame ``i`` is centred
on sample ``i * hop``, as the centred STFT of the mel front end puts it), ``K`` source channels.

Why: a flow vocoder conditioned on mels alone has to *invent* where the next glottal pulse goes.
The teacher learns pulses as variance long before it learns them as mean, and an IAF student
can only echo pulses that its earlier flows made from noise (docs/QUALITY.md). Given the phase
``psi_t`` of the fundamental, a pulse is simply where ``psi`` wraps: the source

    s_t = (v_t sin psi_t, v_t cos psi_t, v_t)        (K = 3 channels, v the voicing)

tells every model when, and the network only has to learn the pulse's shape. With
``harmonics = H > 1`` the source also carries ``v sin(k psi), v cos(k psi)`` for ``k = 2..H``
(``K = 2 H + 1``; each harmonic faded out between 0.4 and 0.5 of the sample rate), so a
network's first layer can form a sharp pulse at any offset from ``psi = 0`` as a weighted sum,
instead of having to build the high harmonics of a glottal pulse from ``sin psi`` and
``cos psi`` through its nonlinearities.

Where ``psi`` comes from:

* **training on real audio** (:meth:`Excitation.analyse`): the F0 and voicing of the audio
  itself (:func:`estimate_f0`, a YIN-style estimator), and the phase of its fundamental
  (:func:`fundamental_phase`: the audio heterodyned by the integrated F0 and low-passed), so
  the source lines up with the pulses the model must learn to place;
* **synthesis** (:meth:`Excitation.from_mel`): F0 and voicing predicted from the mel by a small
  network (:class:`PitchPredictor`, trained beside the model on the estimated contour), and the
  phase integrated from it, starting at 0. A free-running model places its pulses on this
  phase, so the speech is voiced wherever the predictor says so.

The source is a conditioning input like the mel (a function of the audio at training time, of
the mel at synthesis); the flows stay exact, since the noise never enters it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def frames_to_samples(values: Tensor, hop: int, length: int, start: int = 0) -> Tensor:
    """Linear interpolation of per-frame ``values [B, F]`` (frame ``i`` at sample ``i * hop``)
    to samples ``start .. start + length - 1`` ``[B, length]``, held constant past the last
    frame. Sample ``t`` reads frames ``t // hop`` and the one after."""
    frames = values.shape[-1]
    position = torch.arange(start, start + length, device=values.device,
                            dtype=torch.float64) / hop
    left = position.floor().long().clamp(max=frames - 1)
    right = (left + 1).clamp(max=frames - 1)
    frac = (position - left.to(position.dtype)).clamp(max=1.0).to(values.dtype)
    return values[..., left] * (1 - frac) + values[..., right] * frac


def _fill_unvoiced(f0: Tensor, voiced: Tensor, default: float) -> Tensor:
    """``f0 [B, F]`` with unvoiced frames set to the mean voiced F0 of their sequence (or
    ``default`` when none is voiced), so an integrated phase keeps a plausible rate through
    them (the source is silent there anyway)."""
    count = voiced.sum(-1, keepdim=True)
    mean = (f0 * voiced).sum(-1, keepdim=True) / count.clamp(min=1)
    mean = torch.where(count > 0, mean, torch.full_like(mean, default))
    return torch.where(voiced > 0.5, f0, mean)


@torch.no_grad()
def estimate_f0(audio: Tensor, sample_rate: int, hop: int, frames: int,
                fmin: float = 50.0, fmax: float = 500.0, threshold: float = 0.15,
                silence_db: float = -50.0, pick_threshold: float = 0.1,
                octave_ratio: float = 0.3) -> tuple[Tensor, Tensor]:
    """F0 and voicing of ``audio [B, T]`` per frame (frame ``i`` centred on ``i * hop``):
    ``(f0 [B, frames] in Hz, voiced [B, frames] in {0, 1})``, unvoiced frames' F0 being 0.

    YIN (de Cheveigne & Kawahara, 2002): the difference function of each frame over lags of
    one period of ``fmax`` to one of ``fmin``, cumulative-mean normalised (``d'``). The period
    is the first dip of ``d'`` below ``pick_threshold`` (the global minimum when there is
    none), refined to its local minimum; then, when ``d'`` near twice that lag is below
    ``octave_ratio`` times its value, the dip was half a period (a strong second harmonic)
    and the deeper one is taken; a parabola refines the result. A frame is voiced when its
    dip is below ``threshold`` and its level above ``silence_db`` relative to the loudest
    frame of its sequence. Batched with FFTs; no gradient.

    On the demo corpus against its true F0 (issue 18, session 13), the octave check and the
    stricter pick cut the frames off by more than 20% from 2.0% to 0.6% (mostly octave-high
    frames of high voices), with the same voicing decisions (``pick_threshold = threshold =
    0.15``, ``octave_ratio = 0`` is plain YIN).
    """
    audio = audio.float()
    lag_min = max(2, int(sample_rate / fmax))
    lag_max = int(math.ceil(sample_rate / fmin))
    window = lag_max + 1  # the integration window spans the longest period
    span = window + lag_max
    # The integration window is centred on the frame; the lags reach past it to the right.
    pad = window // 2 + 1
    right = max(pad, (frames - 1) * hop + span - window // 2 - audio.shape[-1] + 1)
    # Reflection needs the padding shorter than the signal (a very short clip gets zeros).
    mode = "reflect" if max(pad, right) < audio.shape[-1] else "constant"
    padded = F.pad(audio.unsqueeze(1), (pad, right), mode=mode).squeeze(1)
    starts = torch.arange(frames, device=audio.device) * hop + pad - window // 2
    index = starts[:, None] + torch.arange(span, device=audio.device)
    x = padded[:, index]  # [B, frames, span]
    x = x - x.mean(-1, keepdim=True)
    n_fft = 1 << (2 * span - 1).bit_length()
    head = F.pad(x[..., :window], (0, span - window))
    # r(tau) = sum_{j < window} x_j x_(j + tau): the correlation of the head against x
    r = torch.fft.irfft(torch.fft.rfft(head, n_fft).conj() * torch.fft.rfft(x, n_fft),
                        n_fft)[..., :lag_max + 1]
    energy = F.pad(x.square().cumsum(-1), (1, 0))
    e0 = energy[..., window:window + 1]
    lags = torch.arange(lag_max + 1, device=audio.device)
    e_tau = energy[..., lags + window] - energy[..., lags]
    diff = (e0 + e_tau - 2 * r).clamp(min=0)
    cumulative = diff[..., 1:].cumsum(-1) / lags[1:]
    cmnd = torch.ones_like(diff)
    cmnd[..., 1:] = diff[..., 1:] / cumulative.clamp(min=1e-12)
    search = cmnd[..., lag_min:lag_max]
    below = search < pick_threshold
    # the first dip below the threshold, then down to its local minimum
    first = torch.where(below.any(-1), below.float().argmax(-1),
                        search.argmin(-1))
    lag_index = first.clone()
    for _ in range(lag_max - lag_min):
        nxt = (lag_index + 1).clamp(max=search.shape[-1] - 1)
        step = (search.gather(-1, nxt[..., None]) < search.gather(-1, lag_index[..., None]))
        step = step.squeeze(-1) & (nxt != lag_index)
        if not step.any():
            break
        lag_index = torch.where(step, nxt, lag_index)
    lag = lag_index + lag_min
    best = cmnd.gather(-1, lag[..., None]).squeeze(-1)
    if octave_ratio > 0:
        # A much deeper dip within 3 lags of twice the lag: the first was half a period.
        cand = 2 * lag[..., None] + torch.arange(-3, 4, device=audio.device)
        valid = cand <= lag_max
        values = cmnd.gather(-1, cand.clamp(max=lag_max))
        values = torch.where(valid, values, torch.full_like(values, float("inf")))
        low, where = values.min(-1)
        double = low < octave_ratio * best
        lag = torch.where(double, cand.gather(-1, where[..., None]).squeeze(-1), lag)
        best = torch.where(double, low, best)
    # parabolic refinement of the dip
    lo = cmnd.gather(-1, (lag - 1)[..., None]).squeeze(-1)
    hi = cmnd.gather(-1, (lag + 1).clamp(max=lag_max)[..., None]).squeeze(-1)
    curvature = lo - 2 * best + hi
    offset = torch.where(curvature > 1e-9, 0.5 * (lo - hi) / curvature.clamp(min=1e-9),
                         torch.zeros_like(best)).clamp(-0.5, 0.5)
    f0 = sample_rate / (lag.to(audio.dtype) + offset)
    level = 10 * torch.log10(e0.squeeze(-1) / window + 1e-12)
    loud = level > level.amax(-1, keepdim=True) + silence_db
    voiced = (best < threshold) & loud
    return torch.where(voiced, f0, torch.zeros_like(f0)), voiced.to(audio.dtype)


def integrate_phase(f0_samples: Tensor, sample_rate: int,
                    offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Phase ``[B, T]`` in radians of a sinusoid at ``f0_samples [B, T]`` Hz, 0 at the first
    sample, and the cycles it ends on ``[B, 1]`` (float64, wrapped to [0, 1)).

    ``offset`` (the second result of the previous piece of the same signal) continues a
    signal: the pieces then give the whole signal's phase. Accumulated in float64 and
    wrapped, so long signals keep their precision."""
    steps = f0_samples.double() / sample_rate
    if offset is None:
        offset = -steps[..., :1]
    cycles = torch.frac(offset + torch.cumsum(steps, dim=-1))
    return (2 * math.pi * cycles).to(f0_samples.dtype), cycles[..., -1:]


@torch.no_grad()
def fundamental_phase(audio: Tensor, f0_samples: Tensor, sample_rate: int,
                      fmin: float = 50.0) -> Tensor:
    """The phase ``psi [B, T]`` of the fundamental of ``audio [B, T]`` whose F0 contour is
    ``f0_samples [B, T]``, such that the fundamental is about ``cos(psi)``.

    The audio times ``exp(-i phi)`` (``phi`` the integrated F0) moves the fundamental to 0 Hz
    and every other harmonic to multiples of F0; a Hann low-pass two periods of ``fmin`` long
    keeps the first, whose angle ``theta`` is the fundamental's offset from ``phi``:
    ``psi = phi + theta``.
    """
    phi = integrate_phase(f0_samples, sample_rate)[0]
    length = int(2 * sample_rate / fmin) | 1
    kernel = torch.hann_window(length + 2, periodic=False, device=audio.device,
                               dtype=audio.dtype)[1:-1]
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    mixed = torch.stack([audio * torch.cos(phi), -audio * torch.sin(phi)], dim=1)
    batch = audio.shape[0]
    smooth = F.conv1d(F.pad(mixed.reshape(batch * 2, 1, -1), (length // 2, length // 2)),
                      kernel).view(batch, 2, -1)
    theta = torch.atan2(smooth[:, 1], smooth[:, 0])
    return torch.remainder(phi + theta, 2 * math.pi)


def source_channels(harmonics: int = 1) -> int:
    """``K``, the channels of a source with ``harmonics`` harmonics: ``2 * harmonics + 1``."""
    return 2 * harmonics + 1


def source_signal(phase: Tensor, voicing: Tensor, harmonics: int = 1,
                  f0: Tensor | None = None, sample_rate: float | None = None) -> Tensor:
    """``(v sin psi, v cos psi, ..., v sin(H psi), v cos(H psi), v)`` ``[B, 2 H + 1, T]`` from
    ``phase [B, T]``, ``voicing [B, T]`` (in [0, 1]) and ``H = harmonics``. For ``H > 1``,
    ``f0 [B, T]`` (Hz) and ``sample_rate`` fade harmonic ``k`` linearly from 1 at
    ``k f0 = 0.4 sr`` to 0 at ``0.5 sr``, so none aliases."""
    channels = []
    for k in range(1, harmonics + 1):
        gain = voicing
        if k > 1:
            if f0 is None or sample_rate is None:
                raise ValueError("harmonics above the first need f0 and sample_rate")
            gain = voicing * ((0.5 * sample_rate - k * f0) / (0.1 * sample_rate)).clamp(0, 1)
        channels += [gain * torch.sin(k * phase), gain * torch.cos(k * phase)]
    return torch.stack(channels + [voicing], dim=1)


class PitchPredictor(nn.Module):
    """F0 and voicing from the mel: ``mel [B, n_mels, F] -> (log_f0 [B, F], voiced_logit
    [B, F])``.

    ``n_convs`` convolutions of width 3 over frames (``channels`` wide, leaky ReLU between), so
    a frame's prediction reads ``n_convs`` frames on either side. The input is standardised by
    fixed statistics of log-mels (mean -6, spread 2).

    Two output heads:

    * ``bins = 0`` (regression, the checkpoints before session 13): log-F0 directly, trained
      by its L1 distance to the target and starting at the geometric middle of the range;
    * ``bins = N > 0`` (classification): logits over ``N`` log-spaced F0 values from ``fmin``
      to ``fmax``, trained by cross-entropy against a Gaussian of one bin's width around the
      target; the log-F0 is the softmax-weighted mean of the 9 bins around the most likely
      one. A pitch that could be one of two octaves then stays one of them instead of being
      averaged between: on the demo corpus (session 13) the median error went 20 -> 5 cents
      and the RMSE of the frames within 20% 45 -> 13 cents.
    """

    #: bins on either side of the most likely one that its F0 estimate averages over
    DECODE_RADIUS = 4

    def __init__(self, n_mels: int, channels: int = 64, n_convs: int = 3,
                 fmin: float = 50.0, fmax: float = 500.0, bins: int = 0):
        super().__init__()
        if int(bins) < 0 or int(bins) == 1:
            raise ValueError(f"pitch predictor bins must be 0 (regression) or at least 2, "
                             f"got {bins}")
        layers: list[nn.Module] = []
        width = n_mels
        for _ in range(n_convs):
            layers += [nn.Conv1d(width, channels, 3, padding=1, padding_mode="replicate"),
                       nn.LeakyReLU(0.1)]
            width = channels
        self.body = nn.Sequential(*layers)
        self.bins = int(bins)
        self.out = nn.Conv1d(width, (self.bins or 1) + 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if not self.bins:
            with torch.no_grad():
                self.out.bias[0] = 0.5 * math.log(fmin * fmax)
        self.register_buffer("centres", torch.linspace(math.log(fmin), math.log(fmax),
                                                       max(self.bins, 2)), persistent=False)
        self.n_convs = n_convs
        self.fmin, self.fmax = float(fmin), float(fmax)

    @property
    def lookahead_frames(self) -> int:
        return self.n_convs

    def _raw(self, mel: Tensor) -> Tensor:
        return self.out(self.body((mel + 6.0) * 0.5))

    def _decode(self, logits: Tensor) -> Tensor:
        """Log-F0 ``[B, F]`` of bin logits ``[B, bins, F]``."""
        top = logits.argmax(1, keepdim=True)
        near = (top + torch.arange(-self.DECODE_RADIUS, self.DECODE_RADIUS + 1,
                                   device=logits.device)[None, :, None]).clamp(0, self.bins - 1)
        weights = torch.softmax(logits.gather(1, near), dim=1)
        return (weights * self.centres[near]).sum(1)

    def forward(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        out = self._raw(mel)
        if not self.bins:
            return out[:, 0], out[:, 1]
        return self._decode(out[:, :-1]), out[:, -1]

    def loss(self, mel: Tensor, f0: Tensor, voiced: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Binary cross-entropy of the voicing plus, over voiced frames, the L1 distance of
        log-F0 (regression) or the cross-entropy of the bins (classification), against an
        estimated contour ``f0, voiced [B, F]``; metrics ``pitch_loss``, ``pitch_cents`` (mean
        absolute error of the predicted F0 over voiced frames) and ``voicing_accuracy``."""
        out = self._raw(mel.detach())
        logit = out[:, -1]
        bce = F.binary_cross_entropy_with_logits(logit, voiced)
        mask = voiced > 0.5
        count = mask.sum().clamp(min=1)
        target = torch.log(f0.clamp(self.fmin, self.fmax))
        if self.bins:
            log_f0 = self._decode(out[:, :-1].detach())
            width = self.centres[1] - self.centres[0]
            soft = torch.exp(-0.5 * ((self.centres[None, :, None] - target[:, None]) / width)
                             .square())
            soft = soft / soft.sum(1, keepdim=True)
            pitch = -(soft * torch.log_softmax(out[:, :-1], dim=1)).sum(1)
            error = (log_f0 - target).abs()
        else:
            log_f0 = out[:, 0]
            pitch = error = (log_f0 - target).abs()
        pitch = (pitch * mask).sum() / count
        loss = bce + pitch
        metrics = {"pitch_loss": float(loss.detach()),
                   "pitch_cents": float((error.detach() * mask).sum() / count)
                   * 1200 / math.log(2),
                   "voicing_accuracy": float(((logit > 0) == mask).float().mean())}
        return loss, metrics


class Excitation(nn.Module):
    """The source ``[B, K, T]`` of a model (see the module docstring; ``K =``
    :attr:`source_channels`): from the audio in training (:meth:`analyse`), from the mel at
    synthesis (:meth:`from_mel`); it owns the :class:`PitchPredictor` and its loss."""

    def __init__(self, n_mels: int, sample_rate: int, hop_length: int, fmin: float = 50.0,
                 fmax: float = 500.0, channels: int = 64, n_convs: int = 3,
                 harmonics: int = 1, bins: int = 0):
        super().__init__()
        if int(harmonics) < 1:
            raise ValueError(f"excitation harmonics must be at least 1, got {harmonics}")
        self.sample_rate, self.hop_length = int(sample_rate), int(hop_length)
        self.fmin, self.fmax = float(fmin), float(fmax)
        self.harmonics = int(harmonics)
        self.predictor = PitchPredictor(n_mels, channels, n_convs, fmin, fmax, bins)

    @property
    def source_channels(self) -> int:
        """``K``: the source's channels, ``2 * harmonics + 1``."""
        return source_channels(self.harmonics)

    def _signal(self, phase: Tensor, voicing: Tensor, f0: Tensor) -> Tensor:
        return source_signal(phase, voicing, self.harmonics, f0, self.sample_rate)

    @property
    def lookahead_frames(self) -> int:
        return self.predictor.lookahead_frames

    def config(self) -> dict:
        return dict(sample_rate=self.sample_rate, fmin=self.fmin, fmax=self.fmax,
                    channels=self.predictor.out.in_channels, n_convs=self.predictor.n_convs,
                    harmonics=self.harmonics, bins=self.predictor.bins)

    @property
    def stream_lookahead_frames(self) -> int:
        """Frames after its own that a frame's source reads: the predictor's context and the
        next frame, which the interpolation of F0 and voicing reaches."""
        return self.predictor.lookahead_frames + 1

    def predict(self, mel: Tensor) -> tuple[Tensor, Tensor]:
        """``mel [B, n_mels, F]`` -> ``(f0 [B, F] in Hz, voicing probability [B, F])``."""
        log_f0, logit = self.predictor(mel)
        return torch.exp(log_f0).clamp(self.fmin, self.fmax), torch.sigmoid(logit)

    def from_mel(self, mel: Tensor) -> Tensor:
        """The synthesis source ``[B, K, F * hop]`` from ``mel [B, n_mels, F]``: predicted F0
        and voicing probability, phase integrated from 0."""
        return self.from_mel_frames(mel, 0, mel.shape[-1])[0]

    def from_mel_frames(self, mel: Tensor, first: int, last: int,
                        offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """:meth:`from_mel` for frames ``first .. last - 1`` of ``mel`` only, continuing the
        phase from ``offset`` (see :func:`integrate_phase`; ``None`` starts at 0): ``(source
        [B, K, (last - first) * hop], offset)``. A stream passes windows of frames whose
        predictions and interpolation do not reach the window's edges
        (:attr:`stream_lookahead_frames`); the pieces then equal :meth:`from_mel`."""
        hop = self.hop_length
        f0, voicing = self.predict(mel)
        length, start = (last - first) * hop, first * hop
        f0_samples = frames_to_samples(f0, hop, length, start)
        phase, offset = integrate_phase(f0_samples, self.sample_rate, offset)
        return self._signal(phase, frames_to_samples(voicing, hop, length, start),
                            f0_samples), offset

    def _analysis_source(self, audio: Tensor, f0: Tensor, voiced: Tensor) -> Tensor:
        length = audio.shape[-1]
        f0 = _fill_unvoiced(f0, voiced, math.sqrt(self.fmin * self.fmax))
        f0_samples = frames_to_samples(f0, self.hop_length, length)
        phase = fundamental_phase(audio, f0_samples, self.sample_rate, self.fmin)
        return self._signal(phase, frames_to_samples(voiced, self.hop_length, length),
                            f0_samples)

    def analyse(self, audio: Tensor, mel: Tensor) -> tuple[Tensor, Tensor]:
        """The training source of ``audio [B, T]`` (its own F0, voicing and fundamental phase;
        no gradient) and the predictor's loss on the same contour: ``(source [B, K, T],
        loss)``, with the loss's metrics in ``self.last_metrics``."""
        frames = mel.shape[-1]
        with torch.no_grad():
            f0, voiced = estimate_f0(audio, self.sample_rate, self.hop_length, frames,
                                     self.fmin, self.fmax)
            source = self._analysis_source(audio, f0.to(audio.dtype), voiced.to(audio.dtype))
        loss, self.last_metrics = self.predictor.loss(mel, f0.to(mel.dtype),
                                                      voiced.to(mel.dtype))
        return source, loss


class SourcePieces:
    """The synthesis source of frame ranges ``[lo, hi)`` of one long ``mel [B, n_mels, F]``,
    asked for with non-decreasing ``lo``: each piece equals that range of
    :meth:`Excitation.from_mel` of the whole mel (its phase runs on from the utterance's start),
    while only windows of frames around the range are ever read. For synthesis in overlapping
    chunks (:func:`~vocoder.synthesis.synthesize_long`)."""

    def __init__(self, excitation: Excitation, mel: Tensor):
        self.excitation, self.mel = excitation, mel
        self.context = excitation.stream_lookahead_frames + 1
        self.done, self.phase = 0, None

    def _window(self, lo: int, hi: int, phase: Tensor | None) -> tuple[Tensor, Tensor]:
        first, last = max(0, lo - self.context), min(self.mel.shape[-1], hi + self.context)
        return self.excitation.from_mel_frames(self.mel[..., first:last], lo - first,
                                               hi - first, phase)

    def __call__(self, lo: int, hi: int) -> Tensor:
        if lo < self.done:
            raise ValueError(f"pieces must come in order: {lo} after {self.done}")
        if lo > self.done:  # run the phase on to the piece's start
            self.phase = self._window(self.done, lo, self.phase)[1]
            self.done = lo
        return self._window(lo, hi, self.phase)[0]


def make_excitation(spec, n_mels: int, hop_length: int) -> Excitation | None:
    """The :class:`Excitation` an architecture keyword asks for: ``None``/``False`` for none,
    else a dict of its keywords (``sample_rate`` required; :func:`~vocoder.models.
    model_from_arch` fills it from the front end)."""
    if spec is None or spec is False:
        return None
    spec = {} if spec is True else dict(spec)
    if "sample_rate" not in spec:
        raise ValueError("excitation needs the sample_rate of the mel front end")
    return Excitation(n_mels, hop_length=hop_length, **spec)
