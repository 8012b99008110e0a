"""The embedded demo corpus: speech-like audio synthesised by code, with its true pitch.

Nothing is downloaded. Each utterance comes from a source-filter model of the voice, the
same split real speech production is usually described by:

* **Source.** During vowels a glottal pulse train drives the vocal tract. Each period is an
  LF-like glottal flow pulse: a smooth opening, a closing that steepens to an abrupt glottal
  closure, a short exponential return phase and a closed phase (version 1 of this corpus
  closed smoothly, so most of each pulse could be continued from its last samples); its
  first difference models radiation at the lips and a speaker-dependent pre-emphasis sets the
  spectral tilt. The period follows a moving pitch contour within 80-300 Hz (speaker base
  pitch, declination, accents on syllables, a final rise or fall) whose instantaneous
  frequency is integrated into a phase, so pitch glides never click. Small cycle-to-cycle
  period (jitter) and amplitude (shimmer) changes and some breath noise keep it from
  sounding machine-made.
* **Filter.** The source passes through a cascade of second-order resonators (the
  formants). The centre frequencies and bandwidths of the lowest four glide between vowel
  targets scaled by the speaker's vocal tract length, updated every ``_STEP`` samples while
  the filter state runs on, so there are no block seams; formants 5 to 8 stay fixed per
  speaker and keep weak harmonics up to about 8 kHz, as in real voices.
* **Unvoiced sounds and silence.** Fricatives are band-passed noise, stops are a closure
  followed by a short decaying noise burst, and pauses hold only a low noise floor (never
  exact zeros). Each utterance gets its own peak level, so loudness varies across the corpus.

Because the pitch is made rather than estimated, the true F0 is known for every frame and
pitch errors of a vocoder can be measured against it.

Shapes and units: ``audio`` is float32 ``[T]`` in [-1, 1] at ``sample_rate`` Hz, 1 to 3
seconds long. ``f0`` is float32 ``[T // hop_length + 1]`` in Hz: frame ``i`` is centred on
sample ``i * hop_length`` (centred framing, as in :mod:`vocoder.features`) and holds the
instantaneous glottal frequency there, or 0.0 where the glottal source is off.

An utterance depends only on ``(index, seed)``: any subset can be generated alone, and two
runs give byte-identical arrays. Ten speakers take turns (``index % 10``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.signal import sosfilt

from vocoder.data.signals import (
    _STEP,
    _band_noise,
    _glottal_flow,
    _ramp,
    _resonate,
    _resonator_track,
    _rms,
    _smooth,
    _to_samples,
)

DEMO_SAMPLE_RATE = 22050
DEMO_HOP = 256

_N_SPEAKERS = 10
# Separate random streams for utterances and speakers, so neither shifts the other.
_UTTERANCE_STREAM = 0
_SPEAKER_STREAM = 1

# F1, F2, F3 in Hz of ten English vowels for an adult male voice (the usual textbook
# averages); a speaker scales them by the length of the vocal tract.
_VOWEL_FORMANTS = np.array([
    [270, 2290, 3010],  # i
    [390, 1990, 2550],  # I
    [530, 1840, 2480],  # E
    [660, 1720, 2410],  # ae
    [730, 1090, 2440],  # a
    [570, 840, 2410],   # o
    [440, 1020, 2240],  # U
    [300, 870, 2240],   # u
    [640, 1190, 2390],  # ^
    [490, 1350, 1690],  # er
], dtype=np.float64)

# Noise bands (low, high) in Hz for fricatives ("s", "sh", "f", "h") and stop bursts.
_FRICATIVE_BANDS = ((3800.0, 9000.0), (2000.0, 5500.0), (1200.0, 9000.0), (500.0, 4000.0))
_BURST_BANDS = ((300.0, 2500.0), (3000.0, 9000.0), (1300.0, 3500.0))
# Formants 5 to 8 of an adult male voice, (centre, bandwidth) in Hz; held fixed per speaker.
_HIGHER_FORMANTS = ((4400.0, 300.0), (5500.0, 400.0), (6500.0, 500.0), (7500.0, 600.0))

_F0_RANGE_HZ = (80.0, 300.0)
# Time constant of the LF return phase after each glottal closure, as a fraction of the period
# (Fant's R_a; about 0.01-0.03 in modal voice: 3.7 samples at 150 Hz and 22.05 kHz).
_RETURN_PHASE = 0.025
# Bumped whenever the generator's output changes, so cached features of older versions are
# not reused (it is part of the feature cache's key).
DEMO_VERSION = 2


@dataclass
class DemoUtterance:
    """One generated utterance: ``audio`` float32 [T], ``f0`` float32 [T // hop + 1] in Hz."""

    name: str
    audio: np.ndarray
    f0: np.ndarray
    sample_rate: int


@dataclass(frozen=True)
class _Speaker:
    base_f0: float            # Hz
    formant_scale: float      # multiplies the vowel table (shorter tract, higher formants)
    f4: float                 # Hz
    bandwidths: np.ndarray    # [4] Hz, formants 1 to 4
    open_phase: float         # fraction of a period the glottal flow rises
    closing_phase: float      # fraction of a period it falls
    emphasis: float           # pre-emphasis coefficient; higher is a brighter voice
    breathiness: float        # breath noise relative to the pulse excitation
    jitter: float             # std of the relative period perturbation
    shimmer: float            # std of the relative per-cycle amplitude perturbation


def _speaker(seed: int, speaker_id: int) -> _Speaker:
    rng = np.random.default_rng([seed, _SPEAKER_STREAM, speaker_id])
    base_f0 = float(np.exp(rng.uniform(np.log(100.0), np.log(210.0))))
    # Higher voices tend to come with shorter vocal tracts, hence higher formants.
    pitch_position = np.log(base_f0 / 100.0) / np.log(2.1)
    formant_scale = float(0.93 + 0.22 * pitch_position + rng.normal(0.0, 0.03))
    return _Speaker(
        base_f0=base_f0,
        formant_scale=formant_scale,
        f4=float(3400.0 * formant_scale * rng.uniform(0.97, 1.03)),
        bandwidths=np.array([60.0, 90.0, 130.0, 220.0]) * rng.uniform(0.8, 1.3, 4),
        open_phase=float(rng.uniform(0.35, 0.5)),
        closing_phase=float(rng.uniform(0.12, 0.22)),
        emphasis=float(rng.uniform(0.5, 0.95)),
        breathiness=float(rng.uniform(0.02, 0.12)),
        jitter=float(rng.uniform(0.002, 0.006)),
        shimmer=float(rng.uniform(0.02, 0.06)),
    )


@dataclass(frozen=True)
class _Segment:
    kind: str   # "vowel", "fricative", "stop" or "pause"
    start: int  # first sample
    stop: int   # one past the last sample


def _plan(rng: np.random.Generator, n_samples: int, sr: int) -> list[_Segment]:
    """Syllables (optional consonant onset, vowel, optional fricative coda) and pauses
    between a leading and a trailing silence. The first syllable always fits, so every
    utterance has voiced and unvoiced stretches."""
    cursor = int(rng.uniform(0.06, 0.25) * sr)
    end = n_samples - int(rng.uniform(0.06, 0.2) * sr)
    durations = {"vowel": (0.12, 0.38), "fricative": (0.06, 0.16), "stop": (0.04, 0.09),
                 "pause": (0.08, 0.25)}
    segments: list[_Segment] = []
    while cursor < end:
        syllable = ["vowel"]
        onset = rng.choice(3, p=[0.4, 0.35, 0.25])
        if onset:
            syllable.insert(0, ("fricative", "stop")[onset - 1])
        if rng.random() < 0.2:
            syllable.append("fricative")
        if rng.random() < 0.2:
            syllable.append("pause")
        for kind in syllable:
            low, high = durations[kind]
            stop = min(cursor + int(rng.uniform(low, high) * sr), end)
            if stop - cursor < int(0.04 * sr):
                return segments
            segments.append(_Segment(kind, cursor, stop))
            cursor = stop
    return segments


@lru_cache(maxsize=64)
def _higher_formants(formant_scale: float, sr: int) -> np.ndarray:
    """Second-order sections [4, 6] of unit-DC-gain resonators for formants 5 to 8."""
    sections = []
    for freq, bandwidth in _HIGHER_FORMANTS:
        pole, _ = _resonator_track(np.array(min(freq * formant_scale, 0.45 * sr)),
                                   np.array(bandwidth), sr)
        a1, a2 = -2.0 * pole.real, abs(pole) ** 2
        sections.append([1.0 + a1 + a2, 0.0, 0.0, 1.0, a1, a2])
    return np.array(sections)


def _pitch_track(rng: np.random.Generator, speaker: _Speaker, vowels: list[_Segment],
                 times: np.ndarray, sr: int) -> np.ndarray:
    """Smooth F0 in Hz at the control times: speaker base pitch, declination, slow drift,
    an accent on each vowel and a final rise (a question) or fall."""
    duration = times[-1]
    semitones = rng.normal(0.0, 1.0) - rng.uniform(1.0, 4.0) * times / duration
    drift_knots = np.arange(0.0, duration + 0.25, 0.25)
    semitones = semitones + np.interp(times, drift_knots, rng.normal(0.0, 0.6, len(drift_knots)))
    for seg in vowels:
        centre = rng.uniform(seg.start, seg.stop) / sr
        width = rng.uniform(0.05, 0.12)
        accent = rng.uniform(0.0, 3.0)
        semitones = semitones + accent * np.exp(-0.5 * ((times - centre) / width) ** 2)
    final_length = rng.uniform(0.25, 0.4)
    final_shape = np.clip(1.0 + (times - vowels[-1].stop / sr) / final_length, 0.0, 1.0) ** 2
    final_move = rng.uniform(2.0, 5.0) if rng.random() < 0.25 else -rng.uniform(1.0, 3.0)
    semitones = semitones + final_move * final_shape
    f0 = np.clip(speaker.base_f0 * 2.0 ** (semitones / 12.0), *_F0_RANGE_HZ)
    return _smooth(f0, max(1, int(0.02 * sr / _STEP)))


def _voiced_branch(rng: np.random.Generator, speaker: _Speaker, segments: list[_Segment],
                   n_samples: int, sr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vowels through the formant cascade: (audio [T], voiced mask [T], frequency [T] Hz)."""
    times = np.arange(n_samples // _STEP + 2) * _STEP / sr
    vowels = [s for s in segments if s.kind == "vowel"]

    # Jitter: an independent period perturbation about once per cycle.
    jitter_knots = np.arange(0.0, times[-1] + 0.01, 1.0 / speaker.base_f0)
    jitter = np.interp(times, jitter_knots, rng.normal(0.0, speaker.jitter, len(jitter_knots)))
    frequency = _to_samples(_pitch_track(rng, speaker, vowels, times, sr) * (1.0 + jitter),
                            n_samples)

    # Loudness: stressed and unstressed syllables, fades at the edges of each voiced run.
    voiced = np.zeros(n_samples, dtype=bool)
    stress_times, stress_gains = [], []
    for seg in vowels:
        voiced[seg.start:seg.stop] = True
        stress_times.append(0.5 * (seg.start + seg.stop) / sr)
        stress_gains.append(rng.uniform(0.5, 1.0))
    loudness = np.interp(times, stress_times, stress_gains) * (1.0 - 0.3 * times / times[-1])
    envelope = _to_samples(loudness, n_samples)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], voiced.astype(np.int8), [0]))))
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
        envelope[start:stop] *= _ramp(stop - start, int(rng.uniform(0.01, 0.025) * sr))
    envelope[~voiced] = 0.0

    # The source and the filters run only from the first voiced sample (on a control step)
    # until the formants have rung out after the last one; elsewhere the branch is silent.
    first_step = edges[0] // _STEP
    span = slice(first_step * _STEP, min(n_samples, edges[-1] + int(0.1 * sr)))

    # Glottal source; integrating the frequency keeps the phase continuous.
    phase = rng.random() + np.cumsum(frequency[span]) / sr
    cycle = np.floor(phase).astype(np.int64)
    flow = _glottal_flow(phase - cycle, speaker.open_phase, speaker.closing_phase,
                         _RETURN_PHASE)
    # Shimmer: every cycle starts and ends with zero flow, so a per-cycle gain changes
    # nothing abruptly.
    shimmer = 1.0 + rng.normal(0.0, speaker.shimmer, cycle[-1] - cycle[0] + 1)
    flow = flow * shimmer[cycle - cycle[0]]
    radiated = np.diff(flow, prepend=0.0)
    excitation = radiated - speaker.emphasis * np.concatenate(([0.0], radiated[:-1]))
    breath = rng.standard_normal(len(flow)) * (0.3 + flow)
    excitation = (excitation + speaker.breathiness * np.std(excitation) * breath) * envelope[span]

    # Tracks of formants 1 to 4: one or two vowel targets per vowel, held through consonants.
    knot_times, knot_freqs, knot_bandwidths = [], [], []
    for seg in vowels:
        n_targets = 1 + int(rng.random() < 0.4)
        for k in range(n_targets):
            knot_times.append((seg.start + (k + 0.5) / n_targets * (seg.stop - seg.start)) / sr)
            f123 = _VOWEL_FORMANTS[rng.integers(len(_VOWEL_FORMANTS))] * speaker.formant_scale
            freqs = np.append(f123, speaker.f4) * rng.normal(1.0, 0.03, 4)
            knot_freqs.append(np.minimum(freqs, 0.45 * sr))
            knot_bandwidths.append(speaker.bandwidths * rng.uniform(0.85, 1.2, 4))
    glide = max(1, int(0.03 * sr / _STEP))
    filtered = excitation
    for freqs, bandwidths in zip(np.transpose(knot_freqs), np.transpose(knot_bandwidths),
                                 strict=True):
        pole, weight = _resonator_track(_smooth(np.interp(times, knot_times, freqs), glide),
                                        _smooth(np.interp(times, knot_times, bandwidths), glide),
                                        sr)
        filtered = _resonate(filtered, pole[first_step:], weight[first_step:])
    # Cut after four formants, the cascade would leave almost nothing above 4 kHz, but the
    # vocal tract goes on resonating about every 1 kHz. Formants 5 to 8 barely move with
    # the vowel, so fixed resonators stand in for them and restore the weak high harmonics.
    filtered = sosfilt(_higher_formants(speaker.formant_scale, sr), filtered)
    audio = np.zeros(n_samples)
    audio[span] = filtered
    return audio, voiced, frequency


def generate_utterance(index: int, seed: int = 0, sample_rate: int = DEMO_SAMPLE_RATE,
                       hop_length: int = DEMO_HOP) -> DemoUtterance:
    """Utterance ``index`` of the demo corpus drawn with ``seed``; see the module docstring."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative (got {index}, {seed})")
    if sample_rate < 8000 or hop_length < 1:
        raise ValueError(f"need sample_rate >= 8000 and hop_length >= 1 "
                         f"(got {sample_rate}, {hop_length})")
    sr = int(sample_rate)
    rng = np.random.default_rng([seed, _UTTERANCE_STREAM, index])
    speaker = _speaker(seed, index % _N_SPEAKERS)
    n_samples = int(rng.uniform(1.0, 3.0) * sr)
    segments = _plan(rng, n_samples, sr)

    voiced_audio, voiced, frequency = _voiced_branch(rng, speaker, segments, n_samples, sr)
    audio = voiced_audio / _rms(voiced_audio[voiced])
    for seg in segments:
        length = seg.stop - seg.start
        if seg.kind == "fricative":
            band = _FRICATIVE_BANDS[rng.integers(len(_FRICATIVE_BANDS))]
            level = 10.0 ** (rng.uniform(-24.0, -10.0) / 20.0)
            shape = _ramp(length, int(rng.uniform(0.015, 0.03) * sr))
            audio[seg.start:seg.stop] += level * shape * _band_noise(rng, length, band, sr)
        elif seg.kind == "stop":
            # Closure (silence), then a burst at the release.
            burst = min(length, int(rng.uniform(0.008, 0.02) * sr))
            band = _BURST_BANDS[rng.integers(len(_BURST_BANDS))]
            level = 10.0 ** (rng.uniform(-14.0, -4.0) / 20.0)
            shape = np.exp(-3.0 * np.arange(burst) / burst) * _ramp(burst, int(0.001 * sr) + 1)
            audio[seg.stop - burst:seg.stop] += level * shape * _band_noise(rng, burst, band, sr)

    peak = float(np.exp(rng.uniform(np.log(0.1), np.log(0.9))))
    audio *= peak / np.max(np.abs(audio))
    floor_db = rng.uniform(-65.0, -50.0)
    audio += peak * 10.0 ** (floor_db / 20.0) * rng.standard_normal(n_samples)

    centres = np.minimum(np.arange(n_samples // hop_length + 1) * hop_length, n_samples - 1)
    f0 = np.where(voiced[centres], frequency[centres], 0.0)
    return DemoUtterance(name=f"demo_{index:04d}", audio=audio.astype(np.float32),
                         f0=f0.astype(np.float32), sample_rate=sr)


def generate_demo_corpus(n_utterances: int = 300, seed: int = 0,
                         sample_rate: int = DEMO_SAMPLE_RATE,
                         hop_length: int = DEMO_HOP) -> list[DemoUtterance]:
    """Utterances ``0 .. n_utterances - 1``; each equals its own :func:`generate_utterance`."""
    return [generate_utterance(i, seed, sample_rate, hop_length) for i in range(n_utterances)]


def demo_split(index: int, n_utterances: int) -> str:
    """The fixed split of utterance ``index`` in a corpus of ``n_utterances``.

    The last ``k`` utterances are "test", the ``k`` before them "valid", the rest "train",
    with ``k = max(2, n_utterances // 20)`` (15 of 300), lowered only so that at least one
    training utterance remains in tiny corpora."""
    if not 0 <= index < n_utterances:
        raise ValueError(f"index {index} outside a demo corpus of {n_utterances}")
    held_out = min(max(2, n_utterances // 20), (n_utterances - 1) // 2)
    if index >= n_utterances - held_out:
        return "test"
    if index >= n_utterances - 2 * held_out:
        return "valid"
    return "train"


__all__ = ["DEMO_HOP", "DEMO_SAMPLE_RATE", "DemoUtterance", "demo_split",
           "generate_demo_corpus", "generate_utterance"]
