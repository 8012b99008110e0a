import math

import numpy as np
import pytest
import torch

from vocoder.features import MelFrontEnd
from vocoder.losses import MultiResolutionSTFTLoss
from vocoder.metrics import (
    copy_synthesis_metrics,
    estimate_f0,
    f0_metrics,
    log_mel_distance,
    mel_cepstral_distortion,
    mr_stft_distance,
)

RATE = 22050
HOP = 256


@pytest.fixture(scope="module")
def features():
    return MelFrontEnd.from_preset("tacotron2")


def harmonic_tone(seconds=0.5, f0=180.0, seed=0):
    """A few harmonics under a slow envelope, plus a little noise (never exact silence)."""
    t = np.arange(int(seconds * RATE)) / RATE
    tone = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * t) ** 2
    noise = 1e-3 * np.random.default_rng(seed).standard_normal(t.shape)
    return (0.2 * tone * envelope + noise).astype(np.float32)


def with_noise(audio, level, seed=1):
    return audio + level * np.random.default_rng(seed).standard_normal(audio.shape).astype(
        np.float32)


def test_identical_audio_scores_zero(features):
    x = harmonic_tone()
    assert log_mel_distance(x, x, features) == 0.0
    assert mr_stft_distance(x, x) < 1e-9
    assert mel_cepstral_distortion(x, x, RATE, features=features) == pytest.approx(0.0, abs=1e-4)
    assert mel_cepstral_distortion(x, x.copy(), RATE, include_c0=True) == pytest.approx(
        0.0, abs=1e-4)


def test_distances_grow_with_noise(features):
    x = harmonic_tone()
    levels = (0.003, 0.03, 0.3)
    noisy = [with_noise(x, level) for level in levels]
    for metric in (lambda y: log_mel_distance(x, y, features), lambda y: mr_stft_distance(x, y),
                   lambda y: mel_cepstral_distortion(x, y, RATE, features=features)):
        values = [metric(y) for y in noisy]
        assert 0 < values[0] < values[1] < values[2], values


def test_inputs_are_trimmed_and_may_be_tensors(features):
    x = harmonic_tone()
    longer = np.concatenate([x, np.ones(500, dtype=np.float32)])
    assert log_mel_distance(torch.from_numpy(x), longer, features) == 0.0
    assert mr_stft_distance(longer, torch.from_numpy(x)) < 1e-9


def test_mcd_ignores_gain_only_without_c0(features):
    x = harmonic_tone()
    quieter = 0.5 * x
    assert mel_cepstral_distortion(x, quieter, RATE, features=features) < 1e-3
    # With c0 it is the RMS level difference in dB: exactly 20 log10(2) for a halved amplitude.
    with_c0 = mel_cepstral_distortion(x, quieter, RATE, include_c0=True, features=features)
    assert with_c0 == pytest.approx(20 * math.log10(2), rel=1e-3)


def test_mcd_rejects_a_rate_that_does_not_fit_the_front_end(features):
    x = harmonic_tone()
    with pytest.raises(ValueError, match="16000 Hz"):
        mel_cepstral_distortion(x, x, 16000, features=features)


def test_f0_metrics_octave_error_and_identity():
    ref = np.array([0, 100, 150, 200, 0, 220], dtype=np.float32)
    same = f0_metrics(ref, ref)
    assert same["f0_rmse_cents"] == 0.0 and same["voicing_error"] == 0.0
    assert same["voiced_both"] == 4 and same["frames"] == 6
    octave = f0_metrics(ref, 2 * ref)
    assert octave["f0_rmse_cents"] == pytest.approx(1200.0)
    assert octave["voicing_error"] == 0.0
    assert same["gross_pitch_error"] == 0.0 and octave["gross_pitch_error"] == 1.0


def test_gross_pitch_error_counts_deviations_beyond_20_percent():
    ref = np.array([100, 100, 100, 100, 100, 0], dtype=np.float32)
    # +19% and -15% are fine; +21%, an octave down and 2.4x (formant ringing) are gross;
    # the last frame is voiced only in the synthesis and does not count
    syn = np.array([119, 85, 121, 50, 240, 300], dtype=np.float32)
    result = f0_metrics(ref, syn)
    assert result["voiced_both"] == 5 and result["gross_errors"] == 3
    assert result["gross_pitch_error"] == pytest.approx(3 / 5)
    # the fine RMSE is that of the two frames within 20% only
    fine = 1200 * np.log2(np.array([1.19, 0.85]))
    assert result["f0_rmse_fine_cents"] == pytest.approx(np.sqrt(np.mean(fine ** 2)), rel=1e-5)
    assert result["f0_rmse_cents"] > 2 * result["f0_rmse_fine_cents"]
    assert math.isnan(f0_metrics(np.zeros(4), np.zeros(4))["gross_pitch_error"])
    assert math.isnan(f0_metrics(ref, 2 * ref)["f0_rmse_fine_cents"])  # all gross


def test_voicing_error_counts_disagreements():
    ref = np.array([0, 100, 100, 100, 0, 0, 100, 100], dtype=np.float32)
    syn = np.array([100, 100, 0, 100, 0, 100, 100, 100, 100, 100], dtype=np.float32)
    result = f0_metrics(ref, syn)  # trimmed to 8 frames; frames 0, 2 and 5 disagree
    assert result["frames"] == 8
    assert result["voicing_error"] == pytest.approx(3 / 8)
    assert result["voiced_both"] == 4 and result["voiced_ref"] == 5 and result["voiced_syn"] == 6
    assert math.isnan(f0_metrics(np.zeros(4), np.zeros(4))["f0_rmse_cents"])


def test_pyin_framing_and_copy_synthesis_keys(features):
    x = harmonic_tone(seconds=0.3, f0=200.0)
    f0 = estimate_f0(x, RATE, HOP)
    assert f0.shape == (x.shape[0] // HOP + 1,)
    voiced = f0[f0 > 0]
    assert voiced.size > f0.size // 2
    assert np.median(voiced) == pytest.approx(200.0, rel=0.03)

    true_f0 = np.full(f0.shape, 200.0, dtype=np.float32)
    row = copy_synthesis_metrics(x, with_noise(x, 0.01), features, ref_f0=true_f0)
    for key in ("log_mel_l1", "mr_stft", "mcd_db", "f0_rmse_cents", "voicing_error"):
        assert math.isfinite(row[key]), key
    assert row["f0_source"] == "true"
    assert row["f0_rmse_cents"] < 50


def test_mr_stft_loss_is_differentiable_and_zero_for_equal_inputs():
    loss_fn = MultiResolutionSTFTLoss()
    target = torch.from_numpy(np.stack([harmonic_tone(0.2, f0=150.0),
                                        harmonic_tone(0.2, f0=220.0, seed=3)]))
    same = target.clone().requires_grad_(True)
    loss = loss_fn(same, target)
    loss.backward()
    assert float(loss.detach()) < 1e-9
    assert torch.isfinite(same.grad).all()

    predicted = (target + 0.05 * torch.randn_like(target)).requires_grad_(True)
    loss = loss_fn(predicted, target)
    loss.backward()
    assert float(loss.detach()) > 0.1
    assert torch.isfinite(predicted.grad).all() and predicted.grad.abs().sum() > 0
    # The metric is the same definition on one utterance.
    assert mr_stft_distance(target[0], predicted[0].detach()) == pytest.approx(
        float(loss_fn(predicted[:1], target[:1]).detach()), rel=1e-5)


def test_mr_stft_loss_refuses_too_short_audio():
    with pytest.raises(ValueError, match="too short"):
        MultiResolutionSTFTLoss()(torch.zeros(1, 100), torch.zeros(1, 100))


def test_periodicity_tells_a_pulse_train_from_noise_at_the_true_pitch():
    from vocoder.metrics import periodicity

    rate, hop, f0 = 22050, 256, 150.0
    t = np.arange(rate) / rate
    pulses = (np.sin(2 * np.pi * f0 * t) > 0.995).astype(np.float64)
    contour = np.full(rate // hop + 1, f0)
    contour[:10] = 0.0  # unvoiced frames are not scored
    noise = np.random.default_rng(0).standard_normal(rate)
    assert periodicity(pulses, contour, rate, hop) > 0.9
    assert periodicity(noise, contour, rate, hop) < 0.2
    # periodic, but at another pitch: not periodic at the reference's period
    other = (np.sin(2 * np.pi * 1.37 * f0 * t) > 0.995).astype(np.float64)
    assert periodicity(other, contour, rate, hop) < 0.5
    assert np.isnan(periodicity(noise, np.zeros_like(contour), rate, hop))


def test_pesq_and_stoi_rank_clean_above_noisy_speech():
    pytest.importorskip("pesq")
    pytest.importorskip("pystoi")
    from vocoder.data.demo import generate_utterance
    from vocoder.metrics import pesq_wideband, short_time_objective_intelligibility

    speech = generate_utterance(3).audio[:3 * 22050]
    noisy = with_noise(speech, 0.05)
    clean_pesq, noisy_pesq = (pesq_wideband(speech, x, 22050) for x in (speech, noisy))
    assert clean_pesq > 4.0 and noisy_pesq < clean_pesq - 1.0
    clean_stoi, noisy_stoi = (short_time_objective_intelligibility(speech, x, 22050)
                              for x in (speech, noisy))
    assert clean_stoi > 0.99 and noisy_stoi < clean_stoi


def test_first_pyin_call_of_a_process_runs_under_an_inter_process_lock(monkeypatch):
    # Concurrent first compiles of librosa's numba kernels can corrupt their cache (numba
    # #10128): the first call of each process takes an exclusive file lock, later ones do not.
    fcntl = pytest.importorskip("fcntl")
    import vocoder.metrics as metrics

    calls = []
    real_flock = fcntl.flock

    def flock(fd, op):
        calls.append(op)
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(metrics, "_PYIN_READY", False)
    t = torch.arange(RATE // 2) / RATE
    f0 = estimate_f0(0.5 * torch.sin(2 * math.pi * 200.0 * t), RATE, HOP)
    assert calls == [fcntl.LOCK_EX]
    assert metrics._PYIN_READY
    estimate_f0(0.5 * torch.sin(2 * math.pi * 200.0 * t), RATE, HOP)
    assert calls == [fcntl.LOCK_EX]  # not again
    voiced = f0[f0 > 0]
    assert voiced.size > 10 and np.median(voiced) == pytest.approx(200.0, rel=0.02)
