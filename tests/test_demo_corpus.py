"""The embedded demo corpus: deterministic, well formed, and its stored F0 is the real pitch."""

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from vocoder.data.demo import (
    DEMO_HOP,
    DEMO_SAMPLE_RATE,
    DemoUtterance,
    demo_split,
    generate_demo_corpus,
    generate_utterance,
)

N_UTTERANCES = 8


@pytest.fixture(scope="module")
def corpus() -> list[DemoUtterance]:
    return generate_demo_corpus(N_UTTERANCES, seed=0)


def _same(a: DemoUtterance, b: DemoUtterance) -> bool:
    return (a.name == b.name and a.sample_rate == b.sample_rate
            and a.audio.tobytes() == b.audio.tobytes() and a.f0.tobytes() == b.f0.tobytes())


def test_generation_is_deterministic_and_addressable_by_index(corpus):
    again = generate_demo_corpus(3, seed=0)
    assert all(_same(a, b) for a, b in zip(corpus[:3], again, strict=True))
    alone = generate_utterance(5, seed=0)
    assert alone.name == "demo_0005"
    assert _same(alone, corpus[5])
    assert not _same(generate_utterance(5, seed=1), alone)
    assert len({u.name for u in corpus}) == N_UTTERANCES


def test_shapes_dtypes_and_levels(corpus):
    for u in corpus:
        n = len(u.audio)
        assert u.sample_rate == DEMO_SAMPLE_RATE
        assert u.audio.dtype == np.float32 and u.audio.ndim == 1
        assert 1.0 * DEMO_SAMPLE_RATE <= n <= 3.0 * DEMO_SAMPLE_RATE
        assert u.f0.dtype == np.float32 and u.f0.shape == (n // DEMO_HOP + 1,)
        assert np.isfinite(u.audio).all() and np.isfinite(u.f0).all()
        assert 0.05 < np.abs(u.audio).max() < 1.0
        # Pauses hold a noise floor, not digital silence.
        assert np.count_nonzero(u.audio == 0.0) < 0.001 * n
    peaks = [np.abs(u.audio).max() for u in corpus]
    assert max(peaks) / min(peaks) > 2.0
    assert len({len(u.audio) for u in corpus}) == N_UTTERANCES


def test_f0_contour_is_plausible(corpus):
    medians = []
    for u in corpus:
        voiced = u.f0 > 0
        assert 0.1 < voiced.mean() < 0.95
        assert np.all(u.f0[~voiced] == 0.0)
        assert u.f0[voiced].min() > 75.0 and u.f0[voiced].max() < 320.0
        # Within a voiced run the pitch glides: it moves, but never jumps between frames.
        both = voiced[1:] & voiced[:-1]
        steps = np.abs(np.log(u.f0[1:][both] / u.f0[:-1][both]))
        assert steps.max() < np.log(1.1)
        assert np.log(u.f0[voiced]).std() > 0.01
        medians.append(np.median(u.f0[voiced]))
    assert max(medians) / min(medians) > 1.2  # several speakers


def _yin_pitch(audio: np.ndarray, centres: np.ndarray, sr: int, fmin: float = 60.0,
               fmax: float = 400.0, window: float = 0.04, threshold: float = 0.1) -> np.ndarray:
    """YIN pitch estimate in Hz on a 40 ms window around each centre sample: the lag where
    the cumulative-mean-normalised difference first dips below ``threshold`` (else its
    minimum), refined by a parabola through its neighbours."""
    width = int(window * sr)
    min_lag, max_lag = int(sr / fmax), int(np.ceil(sr / fmin))
    audio = audio.astype(np.float64)
    estimate = np.zeros(len(centres))
    for k, centre in enumerate(centres):
        # Lag tau compares [start, start + width) with the window tau later, so the pair is
        # centred on start + (width + tau) / 2: start so that mid-range lags centre on it.
        start = centre - width // 2 - max_lag // 4
        lagged = sliding_window_view(audio[start:start + width + max_lag], width)[:max_lag + 1]
        diff = np.sum((lagged - lagged[0]) ** 2, axis=1)
        normalised = np.ones_like(diff)
        normalised[1:] = diff[1:] * np.arange(1, max_lag + 1) / np.maximum(np.cumsum(diff[1:]),
                                                                            1e-20)
        dips = np.flatnonzero(normalised[min_lag:max_lag] < threshold)
        if len(dips):
            lag = min_lag + dips[0]
            while lag + 1 < max_lag and normalised[lag + 1] < normalised[lag]:
                lag += 1
        else:
            lag = min_lag + int(np.argmin(normalised[min_lag:max_lag]))
        before, at, after = normalised[lag - 1:lag + 2]
        curvature = before - 2.0 * at + after
        offset = 0.5 * (before - after) / curvature if curvature > 0 else 0.0
        estimate[k] = sr / (lag + offset)
    return estimate


def _relative_errors(estimate: np.ndarray, f0: np.ndarray) -> np.ndarray:
    return np.abs(estimate / f0 - 1.0)


def test_stored_f0_is_the_pitch_of_the_audio(corpus):
    aligned, shifted = [], {-2: [], 2: []}
    for u in corpus[:4]:
        voiced = u.f0 > 0
        # Frames with three voiced neighbours on each side: the whole analysis window is voiced.
        interior = voiced.copy()
        for shift in range(1, 4):
            interior[shift:] &= voiced[:-shift]
            interior[:-shift] &= voiced[shift:]
        frames = np.flatnonzero(interior)
        assert len(frames) >= 20
        estimate = _yin_pitch(u.audio, frames * DEMO_HOP, u.sample_rate)
        errors = _relative_errors(estimate, u.f0[frames])
        assert np.median(errors) < 0.01 and np.mean(errors < 0.03) > 0.9, u.name
        # The criterion is sharp enough to catch a contour 5% off.
        assert np.mean(_relative_errors(estimate, 1.05 * u.f0[frames]) < 0.03) < 0.5
        aligned.append(errors)
        for shift, moved in shifted.items():
            moved.append(_relative_errors(estimate, np.roll(u.f0, shift)[frames]))
    # The contour sits right in time: moved two frames either way, it fits clearly worse.
    # (Octave slips of the estimator, over 10% off, are left out of this comparison.)
    def fit(errors: list[np.ndarray]) -> float:
        pooled = np.concatenate(errors)
        return float(np.mean(pooled[pooled < 0.1]))

    for moved in shifted.values():
        assert fit(aligned) < 0.7 * fit(moved)


def test_hop_only_changes_the_framing(corpus):
    fine = generate_utterance(2, seed=0, hop_length=DEMO_HOP // 2)
    assert fine.audio.tobytes() == corpus[2].audio.tobytes()
    assert fine.f0.shape == (len(fine.audio) // (DEMO_HOP // 2) + 1,)
    # Every other half-hop frame is centred on the same sample as a full-hop frame.
    np.testing.assert_array_equal(fine.f0[::2], corpus[2].f0)


def test_demo_split_is_fixed():
    splits = [demo_split(i, 300) for i in range(300)]
    assert splits == ["train"] * 270 + ["valid"] * 15 + ["test"] * 15
    small = [demo_split(i, 40) for i in range(40)]
    assert small == ["train"] * 36 + ["valid"] * 2 + ["test"] * 2
    assert [demo_split(i, 5) for i in range(5)] == ["train", "valid", "valid", "test", "test"]
    assert [demo_split(i, 3) for i in range(3)] == ["train", "valid", "test"]
    for bad in (-1, 300):
        with pytest.raises(ValueError):
            demo_split(bad, 300)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        generate_utterance(-1)
    with pytest.raises(ValueError):
        generate_utterance(0, seed=-3)
    with pytest.raises(ValueError):
        generate_utterance(0, hop_length=0)


@pytest.mark.parametrize("open_phase,closing_phase", [(0.35, 0.12), (0.5, 0.22)])
def test_glottal_pulse_closes_abruptly_and_ends_at_zero(open_phase, closing_phase):
    from vocoder.data.demo import _RETURN_PHASE, _glottal_flow

    period = 147  # 150 Hz at 22.05 kHz
    phase = np.arange(period) / period
    flow = _glottal_flow(phase, open_phase, closing_phase, _RETURN_PHASE)
    assert flow[0] == 0.0 and abs(flow[-1]) < 1e-3 and 0.99 < flow.max() <= 1.0
    slope = np.diff(np.concatenate([flow, flow[:1]]))  # the radiated excitation, one cycle
    closure = int(slope.argmin())
    # the excitation peaks at the glottal closure instant...
    assert abs(phase[closure] - (open_phase + closing_phase)) < 2.0 / period
    # ...after a slow build-up, and is mostly over a few samples later (LF return phase);
    # a smooth (half-cosine) closure would be symmetric about its peak
    assert slope[closure - 4] < 0.8 * slope[closure]
    assert slope[closure + 4] > 0.5 * slope[closure]
    # continuous flow: no sample-to-sample jump beyond the steepest slope
    assert np.abs(slope).max() < 0.1
