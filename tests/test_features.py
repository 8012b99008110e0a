import librosa
import numpy as np
import pytest
import torch

from vocoder.features import PRESETS, MelFrontEnd


def _librosa_reference(audio: np.ndarray, preset: str) -> np.ndarray:
    c = PRESETS[preset]
    if not c.center:
        audio = np.pad(audio, (c.pad, c.pad), mode="reflect")
    spec = librosa.stft(
        audio,
        n_fft=c.n_fft,
        hop_length=c.hop_length,
        win_length=c.win_length,
        window="hann",
        center=c.center,
        pad_mode="reflect",
    )
    mag = np.sqrt(np.abs(spec) ** 2 + c.magnitude_eps)
    basis = librosa.filters.mel(
        sr=c.sample_rate,
        n_fft=c.n_fft,
        n_mels=c.n_mels,
        fmin=c.fmin,
        fmax=c.fmax,
        htk=False,
        norm="slaney",
    )
    return np.log(np.clip(basis @ mag, c.log_floor, None))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_matches_librosa_reference(preset):
    rng = np.random.default_rng(0)
    t = np.arange(12345) / PRESETS[preset].sample_rate
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(
        np.float32
    )
    audio[:2000] *= 1e-4  # near-silence exercises the log floor
    fe = MelFrontEnd.from_preset(preset)
    ours = fe(torch.from_numpy(audio)).numpy()
    ref = _librosa_reference(audio, preset)
    assert ours.shape == ref.shape == (fe.n_mels, fe.num_frames(len(audio)))
    assert np.abs(ours - ref).max() < 1e-4


def test_batched_equals_single_and_shapes():
    fe = MelFrontEnd.from_preset("tacotron2")
    x = torch.randn(3, 5000) * 0.1
    batched = fe(x)
    assert batched.shape == (3, 80, 5000 // 256 + 1)
    for i in range(3):
        torch.testing.assert_close(batched[i], fe(x[i]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["tacotron2", "hifigan"])
def test_frame_count_matches_hop_times_frames(preset):
    fe = MelFrontEnd.from_preset(preset)
    for frames in (8, 33):
        n = frames * fe.hop_length
        mel = fe(torch.zeros(n))
        assert mel.shape[-1] == fe.num_frames(n)
    # hifigan framing gives exactly T // hop frames for T a multiple of hop
    if preset == "hifigan":
        assert fe.num_frames(33 * 256) == 33


def test_silence_hits_the_log_floor_and_attributes():
    fe = MelFrontEnd.from_preset("tacotron2")
    mel = fe(torch.zeros(4096))
    assert torch.allclose(mel, torch.full_like(mel, np.log(1e-5)))
    assert (fe.sample_rate, fe.hop_length, fe.n_mels) == (22050, 256, 80)
    assert fe.silence_level() == pytest.approx(np.log(1e-5))


def test_round_trip_through_dict_and_errors():
    fe = MelFrontEnd.from_preset("hifigan")
    again = MelFrontEnd.from_dict(fe.config.to_dict())
    assert again.config == fe.config
    with pytest.raises(ValueError, match="unknown mel preset"):
        MelFrontEnd.from_preset("nope")
    with pytest.raises(ValueError, match="too short"):
        fe(torch.zeros(10))
    with pytest.raises(ValueError, match="expects audio"):
        fe(torch.zeros(1, 1, 4096))
