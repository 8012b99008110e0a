"""Signal-processing pieces of the demo corpus generator (:mod:`vocoder.data.demo`): control
tracks interpolated to the sample rate, the LF-like glottal pulse, time-varying resonators and
band-limited noise. Deterministic given their inputs (noise takes the caller's generator)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.signal import butter, sosfilt

# Control hop in samples: pitch, loudness and formant tracks are computed every _STEP
# samples and interpolated linearly in between.
_STEP = 32


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average over ``width`` points, the edges extended by repetition."""
    if width < 2:
        return x
    half = width // 2
    padded = np.pad(x, (half, width - 1 - half), mode="edge")
    total = np.concatenate(([0.0], np.cumsum(padded)))
    return (total[width:] - total[:-width]) / width


def _to_samples(track: np.ndarray, n_samples: int) -> np.ndarray:
    """Linear interpolation of a control-rate track (point ``k`` at sample ``k * _STEP``,
    at least ``n_samples // _STEP + 2`` points, real or complex) to ``[n_samples]``."""
    ramp = np.arange(_STEP) / _STEP
    dense = track[:-1, None] + np.diff(track)[:, None] * ramp
    return dense.reshape(-1)[:n_samples]


def _glottal_flow(phase: np.ndarray, open_phase: float, closing_phase: float,
                  return_phase: float) -> np.ndarray:
    """LF-like flow pulse in [0, 1] at cycle position ``phase`` in [0, 1).

    Opening: a half cosine from 0 to 1 over ``open_phase``. Closing: a quarter cosine from 1
    down to ``r`` over ``closing_phase``, ever steeper, to the glottal closure instant, where
    the flow falls fastest (the main excitation of real voices, as in Fant's LF model). Then
    the LF return phase: an exponential of time constant ``return_phase`` (a fraction of the
    period) takes the rest down to exactly 0 at the end of the cycle, starting with the
    closing slope, so flow and slope stay continuous and the pulse train aliases little, but
    the slope turns back within a few samples. ``r`` follows from matching the slopes:
    ``r / (ta (1 - E)) = (1 - r) pi / (2 cp)`` with ``E = exp(-(1 - closure) / ta)``.
    """
    closure = open_phase + closing_phase
    floor = np.exp(-(1.0 - closure) / return_phase)
    a = 0.5 * np.pi * return_phase * (1.0 - floor) / closing_phase
    r = a / (1.0 + a)
    rising = 0.5 - 0.5 * np.cos(np.pi * np.minimum(phase / open_phase, 1.0))
    falling = r + (1.0 - r) * np.cos(0.5 * np.pi * np.clip((phase - open_phase) / closing_phase,
                                                            0.0, 1.0))
    decay = np.exp(-np.maximum(phase - closure, 0.0) / return_phase)
    tail = r * (decay - floor) / (1.0 - floor)
    return np.where(phase < open_phase, rising, np.where(phase < closure, falling, tail))


def _resonator_track(freq: np.ndarray, bandwidth: np.ndarray,
                     sr: int) -> tuple[np.ndarray, np.ndarray]:
    """Pole and output weight (complex, same shape as the inputs) of a second-order
    resonator with unit gain at DC, centre ``freq`` and ``bandwidth`` in Hz."""
    radius = np.exp(-np.pi * bandwidth / sr)
    theta = 2.0 * np.pi * freq / sr
    pole = radius * np.exp(1j * theta)
    gain = 1.0 - 2.0 * radius * np.cos(theta) + radius**2
    return pole, gain * (1.0 - 1j / np.tan(theta))


def _resonate(x: np.ndarray, pole: np.ndarray, weight: np.ndarray,
              block: int = 512) -> np.ndarray:
    """Run ``x`` [T] through a resonator whose pole and output weight (complex, one value
    per ``_STEP`` samples, see :func:`_resonator_track`) glide along the signal.

    The real pole pair ``p, conj(p)`` is run as one complex first-order recursion
    ``z[n] = p[n] z[n-1] + x[n]`` read out as ``y = Re(w z)``, the partial-fraction form of
    the resonator. The state ``z`` runs on across coefficient changes, so steps of ``_STEP``
    samples leave no seams. Within a block the recursion has a closed form (cumulative
    products and sums), so only the state carried between blocks needs a Python loop; with
    speech bandwidths ``|p| ** block`` stays far from underflow."""
    n = len(x)
    n_blocks = -(-n // block)
    n_steps = n_blocks * block // _STEP
    pole = np.pad(pole[:n_steps], (0, max(0, n_steps - len(pole))), mode="edge")
    decay = np.cumprod(np.repeat(pole, _STEP).reshape(n_blocks, block), axis=1)
    inputs = np.pad(x, (0, n_blocks * block - n)).reshape(n_blocks, block)
    partial = np.cumsum(inputs / decay, axis=1)
    carried = np.empty(n_blocks, dtype=complex)
    previous = 0j
    for b, (last, through) in enumerate(zip(partial[:, -1].tolist(), decay[:, -1].tolist(),
                                            strict=True)):
        carried[b] = previous
        previous = through * (last + previous)
    partial += carried[:, None]
    state = (decay * partial).reshape(n_steps, _STEP)
    weight = np.pad(weight[:n_steps], (0, max(0, n_steps - len(weight))), mode="edge")
    return np.real(state * weight[:, None]).reshape(-1)[:n]


def _ramp(length: int, ramp: int) -> np.ndarray:
    """1.0 with half-cosine fades of ``ramp`` samples at both ends."""
    envelope = np.ones(length)
    ramp = max(1, min(ramp, length // 2))
    fade = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
    envelope[:ramp] = fade
    envelope[length - ramp:] = np.minimum(envelope[length - ramp:], fade[::-1])
    return envelope


@lru_cache(maxsize=64)
def _band_pass(low: float, high: float, sr: int) -> np.ndarray:
    return butter(4, [low, min(high, 0.45 * sr)], btype="bandpass", fs=sr, output="sos")


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


def _band_noise(rng: np.random.Generator, length: int, band: tuple[float, float],
                sr: int) -> np.ndarray:
    """Unit-RMS noise band-passed to ``band`` (Hz), trimmed to the Nyquist limit."""
    settle = 256  # dropped: the filter's start-up transient
    noise = sosfilt(_band_pass(*band, sr), rng.standard_normal(length + settle))[settle:]
    return noise / (_rms(noise) + 1e-12)
