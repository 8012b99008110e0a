"""Copy-synthesis quality: how far a vocoder's audio is from the recording its mel came from.

Every function takes a reference and a synthesised waveform (mono float, numpy or torch,
``[T]``, same sample rate) and first trims both to the shorter length. Copy-synthesis keeps
the time axis (``F`` frames in, ``F * hop`` samples out), so frames are compared one to one;
nothing is time-warped.

Lower is better for every number here:

* ``log_mel_l1``: mean absolute difference of natural-log mels from the one front end;
* ``mr_stft``: multi-resolution STFT distance (:class:`~vocoder.losses.MultiResolutionSTFTLoss`);
* ``mcd_db``: mel-cepstral distortion in dB (:func:`mel_cepstral_distortion`);
* ``f0_rmse_cents``, ``voicing_error``: pitch error over frames voiced in both, and the fraction
  of frames whose voiced/unvoiced decision differs (:func:`f0_metrics`);

and higher is better for ``periodicity`` (the synthesis' autocorrelation at the reference's
pitch period in voiced frames, :func:`periodicity`), ``pesq_wb`` (wide-band PESQ) and ``stoi``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from vocoder.features import PRESETS, MelFrontEnd
from vocoder.losses import DEFAULT_RESOLUTIONS, MultiResolutionSTFTLoss

_DB_PER_NEPER = 10.0 / math.log(10.0)


def _as_tensor(audio, device: torch.device | str = "cpu") -> Tensor:
    x = audio if isinstance(audio, Tensor) else torch.from_numpy(np.asarray(audio))
    x = x.detach().to(device=device, dtype=torch.float32)
    if x.dim() != 1:
        raise ValueError(f"expected mono audio [T], got shape {tuple(x.shape)}")
    return x


def _trimmed(ref, syn, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    ref, syn = _as_tensor(ref, device), _as_tensor(syn, device)
    length = min(ref.shape[-1], syn.shape[-1])
    return ref[:length], syn[:length]


def _device_of(features: MelFrontEnd) -> torch.device:
    return features.mel_basis.device


@torch.no_grad()
def log_mel_distance(ref, syn, features: MelFrontEnd) -> float:
    """Mean over bands and frames of ``|ln mel(ref) - ln mel(syn)|`` (the front end's log-mels,
    floored at ``ln(log_floor)``), in nepers."""
    ref, syn = _trimmed(ref, syn, _device_of(features))
    return float((features(ref) - features(syn)).abs().mean())


@torch.no_grad()
def mr_stft_distance(ref, syn,
                     resolutions: Sequence[Sequence[int]] = DEFAULT_RESOLUTIONS) -> float:
    """Multi-resolution STFT distance: the mean over ``resolutions`` ``(n_fft, hop, win)`` of

        ||S_r - S_s||_F / ||S_r||_F  +  mean |ln S_r - ln S_s|

    with ``S`` the Hann-windowed STFT magnitudes of reference and synthesis (spectral
    convergence plus log-magnitude L1). It is exactly the training loss
    :class:`~vocoder.losses.MultiResolutionSTFTLoss`, evaluated on one utterance.
    """
    device = ref.device if isinstance(ref, Tensor) else "cpu"
    ref, syn = _trimmed(ref, syn, device)
    loss = MultiResolutionSTFTLoss(resolutions).to(device)
    return float(loss(syn.unsqueeze(0), ref.unsqueeze(0)))


def front_end_for_rate(sample_rate: int) -> MelFrontEnd:
    """A front end at ``sample_rate``: the first preset at that rate (``tacotron2`` at
    22050 Hz), else the ``tacotron2`` settings with the rate (and ``fmax``, at most Nyquist)
    replaced."""
    for config in PRESETS.values():
        if config.sample_rate == int(sample_rate):
            return MelFrontEnd(config)
    base = PRESETS["tacotron2"]
    return MelFrontEnd(dataclasses.replace(
        base, name=f"{base.name}@{int(sample_rate)}", sample_rate=int(sample_rate),
        fmax=min(base.fmax, sample_rate / 2)))


def _cosine_series_matrix(n_bands: int, n_coefficients: int, device) -> Tensor:
    """``C[d, n] = cos(pi d (n + 1/2) / N) / N``: the DCT-II scaled so that a log spectrum
    ``L_n = c_0 + 2 sum_{d>=1} c_d cos(pi d (n + 1/2) / N)`` for ``c = C @ L``."""
    d = torch.arange(n_coefficients, dtype=torch.float64).unsqueeze(1)
    n = torch.arange(n_bands, dtype=torch.float64).unsqueeze(0)
    return (torch.cos(math.pi * d * (n + 0.5) / n_bands) / n_bands).float().to(device)


@torch.no_grad()
def mel_cepstrum(audio, features: MelFrontEnd, n_mfcc: int = 24) -> Tensor:
    """Mel-cepstra ``[n_mfcc, F]`` (``c_0 .. c_{n_mfcc-1}``) of mono ``audio [T]``.

    The log mel power spectrum is ``L = 2 ln mel`` (the front end's natural-log mel
    magnitudes, squared); the cepstrum is its DCT-II along the mel axis, the transform
    ``librosa.feature.mfcc`` uses, scaled by ``1/N`` (``N`` mel bands) rather than
    orthonormally and taken of natural-log rather than dB power, so that
    ``L_n = c_0 + 2 sum_{d>=1} c_d cos(pi d (n + 1/2) / N)`` over the first ``n_mfcc`` terms.
    """
    features_device = _device_of(features)
    log_power = 2.0 * features(_as_tensor(audio, features_device))
    if not 1 <= n_mfcc <= log_power.shape[0]:
        raise ValueError(f"n_mfcc must be in 1..{log_power.shape[0]}, got {n_mfcc}")
    return _cosine_series_matrix(log_power.shape[0], n_mfcc, features_device) @ log_power


@torch.no_grad()
def mel_cepstral_distortion(ref, syn, sample_rate: int, n_mfcc: int = 24,
                            include_c0: bool = False,
                            features: MelFrontEnd | None = None) -> float:
    """Mel-cepstral distortion in dB, averaged over frames (aligned one to one, no DTW).

    Per frame, with ``c`` and ``c'`` the :func:`mel_cepstrum` of reference and synthesis::

        MCD = 10 / ln 10 * sqrt(2 * sum_{d=1}^{n_mfcc-1} (c_d - c'_d)^2)

    ``c_0``, the frame's mean log level, is left out by default, so a change of gain does not
    count. With that cepstrum scaling (natural-log power, DCT divided by ``N``), Parseval's
    identity makes the value the RMS difference over mel bands, in dB, of the two cepstrally
    smoothed log mel power spectra with each frame's mean level removed. ``include_c0=True``
    adds ``(c_0 - c'_0)^2`` (weight 1, the exact Parseval term) under the square root, giving
    the RMS dB difference including level. Values are on this toolkit's scale (80 Slaney mel
    bands), not directly comparable with SPTK ``mcep``-based numbers from papers.

    ``features`` is the front end to use (a model's own, in evaluation); by default
    :func:`front_end_for_rate` picks one for ``sample_rate``.
    """
    if features is None:
        features = front_end_for_rate(sample_rate)
    if int(sample_rate) != features.sample_rate:
        raise ValueError(f"audio at {sample_rate} Hz does not fit the mel preset "
                         f"{features.config.name!r} ({features.sample_rate} Hz)")
    ref, syn = _trimmed(ref, syn, _device_of(features))
    diff = mel_cepstrum(ref, features, n_mfcc) - mel_cepstrum(syn, features, n_mfcc)
    squared = 2.0 * diff[1:].square().sum(dim=0)
    if include_c0:
        squared = squared + diff[0].square()
    return float(_DB_PER_NEPER * torch.sqrt(squared).mean())


_PYIN_READY = False


def _pyin():
    """``librosa.pyin``, after this process has loaded (or compiled) its numba kernels once
    under an inter-process lock.

    librosa compiles pyin's numba gufuncs on first use and caches them beside its sources. Two
    processes compiling them at the same time can leave kernel and wrapper caches that do not
    match, and every later call in any process then segfaults (numba issue #10128; seen here
    with two evaluations started together on a fresh install). The lock lets one process at a
    time make the first call (float32 and float64, as evaluation and training use), so later
    processes find a complete cache. Without ``fcntl`` (Windows) or a writable temp directory
    the first call runs unlocked.
    """
    global _PYIN_READY
    import librosa

    if _PYIN_READY:
        return librosa.pyin
    lock = None
    try:
        import fcntl

        path = os.path.join(tempfile.gettempdir(), "flow-vocoder-numba.lock")
        lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(lock, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass
    try:
        noise = np.random.default_rng(0).standard_normal(4096)
        for dtype in (np.float32, np.float64):
            librosa.pyin(noise.astype(dtype), fmin=100.0, fmax=400.0, sr=16000,
                         frame_length=1024, hop_length=256)
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock
    _PYIN_READY = True
    return librosa.pyin


def estimate_f0(audio, sample_rate: int, hop_length: int, fmin: float = 50.0,
                fmax: float = 500.0) -> np.ndarray:
    """F0 in Hz per frame (0.0 where unvoiced) with ``librosa.pyin``, float32 ``[T // hop + 1]``.

    Frames are centred like the front end's (frame ``i`` at sample ``i * hop``). The analysis
    frame is the smallest power of two holding four periods of ``fmin`` (2048 samples at
    22.05 kHz and 50 Hz). pyin is slow (about real time on one core): call it only on what
    needs it.
    """
    pyin = _pyin()
    y = _as_tensor(audio).numpy()
    frame_length = 1 << math.ceil(math.log2(4.0 * sample_rate / fmin))
    f0, voiced, _ = pyin(y, fmin=fmin, fmax=fmax, sr=sample_rate, frame_length=frame_length,
                         hop_length=hop_length, center=True)
    f0 = np.where(voiced & np.isfinite(f0), f0, 0.0).astype(np.float32)
    return f0[: y.shape[-1] // hop_length + 1]


# The usual gross pitch error threshold: a 20% deviation of F0 (Chu & Alwan and most pitch
# tracking papers), in cents. Larger deviations either way count as gross.
GROSS_PITCH_ERROR_CENTS = 1200.0 * math.log2(1.2)


def f0_metrics(ref_f0, syn_f0) -> dict:
    """Pitch and voicing agreement of two F0 contours (Hz per frame, 0 = unvoiced).

    Contours are trimmed to the shorter one. Returns:

    * ``f0_rmse_cents``: ``sqrt(mean((1200 log2(f_syn / f_ref))^2))`` over frames voiced in
      both (NaN when there are none); an octave error is 1200 cents;
    * ``voicing_error``: fraction of frames where exactly one of the two is voiced;
    * ``gross_pitch_error``: fraction of the frames voiced in both whose F0 is off by more
      than 20% (:data:`GROSS_PITCH_ERROR_CENTS`, about 316 cents either way: octave jumps,
      formant ringing), NaN when there are none; ``gross_errors`` is their count. A few such
      frames dominate an F0 RMSE; this says how many there are;
    * ``f0_rmse_fine_cents``: the F0 RMSE over the other frames voiced in both (those within
      20%), NaN when there are none: how close the pitch is where it is not grossly wrong;
    * ``frames``, ``voiced_both``, ``voiced_ref``, ``voiced_syn``: frame counts.
    """
    ref_f0 = np.asarray(ref_f0, dtype=np.float64).reshape(-1)
    syn_f0 = np.asarray(syn_f0, dtype=np.float64).reshape(-1)
    length = min(ref_f0.shape[0], syn_f0.shape[0])
    ref_f0, syn_f0 = ref_f0[:length], syn_f0[:length]
    ref_voiced = np.isfinite(ref_f0) & (ref_f0 > 0)
    syn_voiced = np.isfinite(syn_f0) & (syn_f0 > 0)
    both = ref_voiced & syn_voiced
    if both.any():
        cents = 1200.0 * np.log2(syn_f0[both] / ref_f0[both])
        rmse = float(np.sqrt(np.mean(cents ** 2)))
        is_gross = np.abs(cents) > GROSS_PITCH_ERROR_CENTS
        gross = int(np.sum(is_gross))
        fine = float(np.sqrt(np.mean(cents[~is_gross] ** 2))) if gross < cents.size else math.nan
    else:
        rmse, gross, fine = float("nan"), 0, float("nan")
    return {
        "f0_rmse_cents": rmse,
        "gross_pitch_error": gross / int(both.sum()) if both.any() else float("nan"),
        "gross_errors": gross,
        "f0_rmse_fine_cents": fine,
        "voicing_error": float(np.mean(ref_voiced != syn_voiced)) if length else float("nan"),
        "frames": int(length),
        "voiced_both": int(both.sum()),
        "voiced_ref": int(ref_voiced.sum()),
        "voiced_syn": int(syn_voiced.sum()),
    }


def periodicity(audio, f0, sample_rate: int, hop_length: int, window: int = 1024) -> float:
    """How periodic ``audio`` is at a given pitch: the mean, over frames where ``f0`` (Hz per
    frame, 0 = unvoiced; frame ``i`` centred on sample ``i * hop``) is voiced, of the
    normalised autocorrelation of a ``window``-sample stretch at the period ``sr / f0`` (the
    best of the lags within one sample of it, and one more above). 1 for a perfectly periodic
    signal at that pitch, about 0 for noise (slightly above: the best of four lags), NaN when
    no frame is voiced.

    Unlike an F0 tracker's decision it cannot be fooled by formant ringing of unvoiced output:
    it asks whether the synthesis repeats at the reference's own period.
    """
    x = _as_tensor(audio).double().numpy()
    f0 = np.asarray(f0, dtype=np.float64).reshape(-1)
    values = []
    for i in np.flatnonzero(np.isfinite(f0) & (f0 > 0)):
        first = i * hop_length - window // 2
        if first < 0 or first + window > x.shape[0]:
            continue
        segment = x[first:first + window] - x[first:first + window].mean()
        period = sample_rate / f0[i]
        scores = [0.0]  # a silent window scores 0
        for lag in range(max(1, int(period) - 1), min(int(period) + 3, window)):
            a, b = segment[:-lag], segment[lag:]
            norm = math.sqrt(float(a @ a) * float(b @ b))
            if norm > 0:
                scores.append(float(a @ b) / norm)
        values.append(max(scores[1:]) if len(scores) > 1 else 0.0)
    return float(np.mean(values)) if values else float("nan")


def pesq_wideband(ref, syn, sample_rate: int) -> float | None:
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO 1.0-4.6, higher is better) of ``syn`` against
    ``ref``, both resampled to 16 kHz; ``None`` when the ``pesq`` package is not installed,
    NaN when PESQ finds no speech in the reference."""
    try:
        from pesq import pesq
    except ImportError:
        return None
    import librosa

    ref16, syn16 = (librosa.resample(_as_tensor(a).numpy(), orig_sr=sample_rate,
                                     target_sr=16000) for a in (ref, syn))
    try:
        return float(pesq(16000, ref16, syn16, "wb"))
    except Exception:  # noqa: BLE001 - pesq raises its own error types for silent input
        return float("nan")


def short_time_objective_intelligibility(ref, syn, sample_rate: int) -> float | None:
    """STOI (Taal et al., 2011; 0-1, higher is better) of ``syn`` against ``ref``; ``None``
    when the ``pystoi`` package is not installed."""
    try:
        from pystoi import stoi
    except ImportError:
        return None
    return float(stoi(_as_tensor(ref).numpy(), _as_tensor(syn).numpy(), sample_rate))


def copy_synthesis_metrics(ref, syn, features: MelFrontEnd, ref_f0=None,
                           f0_range: tuple[float, float] = (50.0, 500.0),
                           n_mfcc: int = 24) -> dict:
    """All copy-synthesis metrics of one utterance, as a flat dict.

    Keys: ``log_mel_l1``, ``mr_stft``, ``mcd_db`` (``c_0`` excluded), ``f0_rmse_cents``,
    ``voicing_error``, ``f0_source`` (``"true"`` when ``ref_f0``, the known F0 of the
    reference, is given; ``"pyin"`` when it was estimated from the reference audio), the
    frame counts of :func:`f0_metrics`, and ``periodicity`` / ``periodicity_reference``
    (:func:`periodicity` of the synthesis and of the reference at the reference's F0),
    ``pesq_wb`` and ``stoi`` (``None`` without the optional ``pesq`` / ``pystoi`` packages).
    The synthesis' F0 is always estimated with pyin.
    """
    device = _device_of(features)
    ref, syn = _trimmed(ref, syn, device)
    rate, hop = features.sample_rate, features.hop_length
    if ref_f0 is None:
        ref_f0, source = estimate_f0(ref.cpu(), rate, hop, *f0_range), "pyin"
    else:
        source = "true"
    syn_f0 = estimate_f0(syn.cpu(), rate, hop, *f0_range)
    row = {
        "log_mel_l1": log_mel_distance(ref, syn, features),
        "mr_stft": mr_stft_distance(ref, syn),
        "mcd_db": mel_cepstral_distortion(ref, syn, rate, n_mfcc=n_mfcc, features=features),
    }
    row.update(f0_metrics(ref_f0, syn_f0))
    row["periodicity"] = periodicity(syn.cpu(), ref_f0, rate, hop)
    row["periodicity_reference"] = periodicity(ref.cpu(), ref_f0, rate, hop)
    row["pesq_wb"] = pesq_wideband(ref.cpu(), syn.cpu(), rate)
    row["stoi"] = short_time_objective_intelligibility(ref.cpu(), syn.cpu(), rate)
    row["f0_source"] = source
    return row
