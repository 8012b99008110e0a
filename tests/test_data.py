import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from vocoder.audio import load_audio, write_wav
from vocoder.data.corpus import PreparedCorpus, prepare_corpus
from vocoder.data.dataset import SegmentDataset, SegmentSampler, validation_batches
from vocoder.errors import InputError, VocoderError
from vocoder.features import MelFrontEnd

SR = 22050


def _tone(seconds, sr, freq=220.0, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.4 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


@pytest.fixture
def messy_folder(tmp_path):
    root = tmp_path / "audio"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "stereo16k.wav", _tone(1.0, 16000, channels=2), 16000)
    sf.write(root / "mono44k.wav", _tone(1.0, 44100), 44100)
    sf.write(root / "sub" / "clip.flac", _tone(1.0, SR), SR)
    (root / "empty.wav").write_bytes(b"")
    (root / "garbage.wav").write_bytes(b"RIFF\x00\x01garbage" * 50)
    nan = _tone(1.0, SR)
    nan[100] = np.nan
    sf.write(root / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(root / "short.wav", _tone(0.05, SR), SR)
    sf.write(root / "silent.wav", np.zeros(SR, dtype=np.float32), SR)
    return root


def _folder_cfg(root, tmp_path):
    return OmegaConf.create({"name": "folder", "root": str(root), "valid_per_1000": 0,
                             "test_per_1000": 0, "cache_dir": str(tmp_path / "cache")})


def test_folder_prepares_good_files_and_names_broken_ones(messy_folder, tmp_path):
    fe = MelFrontEnd.from_preset("tacotron2")
    logs = []
    corpus = prepare_corpus(_folder_cfg(messy_folder, tmp_path), fe, tmp_path / "cache",
                            min_samples=16 * 256, log=logs.append, progress=False)
    names = sorted(e["name"] for e in corpus.entries())
    assert names == ["mono44k", "stereo16k", "sub__clip"]
    reasons = {s["file"].split("/")[-1]: s["reason"] for s in corpus.manifest["skipped"]}
    assert set(reasons) == {"empty.wav", "garbage.wav", "nan.wav", "short.wav", "silent.wav"}
    assert "empty" in reasons["empty.wav"]
    assert "decode" in reasons["garbage.wav"]
    assert "NaN" in reasons["nan.wav"]
    assert "too short" in reasons["short.wav"]
    assert "silent" in reasons["silent.wav"]
    assert any("resampling" in line for line in logs)
    assert any("down-mixing" in line for line in logs)
    # resampled to 22050 Hz: one second stays one second
    for e in corpus.entries():
        assert abs(e["samples"] - SR) <= 2
        mel = corpus.mel(e["name"])
        assert mel.shape == (80, fe.num_frames(e["samples"]))
    # a second run reuses the cache instead of recomputing
    logs.clear()
    again = prepare_corpus(_folder_cfg(messy_folder, tmp_path), fe, tmp_path / "cache",
                           min_samples=16 * 256, log=logs.append, progress=False)
    assert again.root == corpus.root and any("reusing" in line for line in logs)


def test_no_usable_file_is_a_clear_error(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "a.wav").write_bytes(b"")
    with pytest.raises(VocoderError, match="no usable audio file"):
        prepare_corpus(_folder_cfg(root, tmp_path), MelFrontEnd.from_preset("tacotron2"),
                       tmp_path / "cache", log=lambda s: None, progress=False)
    with pytest.raises(VocoderError, match="not a folder"):
        prepare_corpus(_folder_cfg(tmp_path / "missing", tmp_path),
                       MelFrontEnd.from_preset("tacotron2"), tmp_path / "cache",
                       log=lambda s: None, progress=False)


def test_prepare_cli_reports_and_fails_cleanly(messy_folder, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "vocoder.cli.prepare", "data=folder",
                         f"data.root={messy_folder}", f"run_dir={tmp_path / 'run'}"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "3 files" in ok.stdout and "left out 5 file(s)" in ok.stdout
    assert "garbage.wav" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "vocoder.cli.prepare", "data=folder",
                          f"data.root={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'run2'}"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_ljspeech_layout_and_held_out_split(tmp_path):
    root = tmp_path / "LJSpeech-1.1"
    (root / "wavs").mkdir(parents=True)
    ids = [f"LJ001-{i:04d}" for i in range(1, 31)]
    with open(root / "metadata.csv", "w") as f:
        for uid in ids:
            f.write(f"{uid}|Text {uid}.|Text {uid}.\n")
            sf.write(root / "wavs" / f"{uid}.wav", _tone(0.5, SR, 100 + len(uid)), SR,
                     subtype="PCM_16")
    cfg = OmegaConf.create({"name": "ljspeech", "root": str(root), "n_valid": 2, "n_test": 3,
                            "cache_dir": str(tmp_path / "cache")})
    corpus = prepare_corpus(cfg, MelFrontEnd.from_preset("tacotron2"), tmp_path / "cache",
                            log=lambda s: None, progress=False)
    assert [e["name"] for e in corpus.entries("test")] == ids[-3:]
    assert [e["name"] for e in corpus.entries("valid")] == ids[-5:-3]
    assert len(corpus.entries("train")) == 25
    reopened = PreparedCorpus.open(corpus.root)
    assert reopened.manifest == corpus.manifest


def test_load_audio_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="missing.wav: file not found"):
        load_audio(tmp_path / "missing.wav", SR)
    p = tmp_path / "x.wav"
    p.write_bytes(b"not audio at all" * 10)
    with pytest.raises(InputError, match="x.wav: cannot decode"):
        load_audio(p, SR)


def test_write_wav_is_16_bit_and_clipped(tmp_path):
    out = tmp_path / "o.wav"
    write_wav(out, torch.tensor([0.0, 0.5, 2.0, -2.0, float("nan")]), SR)
    data, sr = sf.read(out, dtype="int16")
    assert sr == SR and sf.info(out).subtype == "PCM_16"
    assert data.tolist() == [0, 16384, 32767, -32768, 0]
    assert not list(tmp_path.glob("*.tmp"))


def test_segments_align_audio_and_mel_and_sampler_is_resumable(messy_folder, tmp_path):
    fe = MelFrontEnd.from_preset("tacotron2")
    corpus = prepare_corpus(_folder_cfg(messy_folder, tmp_path), fe, tmp_path / "cache",
                            min_samples=16 * 256, log=lambda s: None, progress=False)
    ds = SegmentDataset(corpus, "train", segment_frames=16)
    sampler = SegmentSampler(len(ds), seed=3)
    items = [next(iter(SegmentSampler(len(ds), seed=3, start=k))) for k in range(7)]
    it = iter(sampler)
    assert [next(it) for _ in range(7)] == items
    audio, mel = ds[items[0]]
    assert audio.shape == (16 * 256,) and mel.shape == (80, 16)
    # the mel of the segment's audio matches the cached mel away from the segment edges
    recomputed = fe(audio)[:, 3:13]
    assert torch.allclose(recomputed, mel[:, 3:-3], atol=1e-3)
    # two ranks see disjoint halves of the same global order
    r0 = SegmentSampler(len(ds), seed=3, rank=0, world_size=2)
    r1 = SegmentSampler(len(ds), seed=3, rank=1, world_size=2)
    i0, i1, ig = iter(r0), iter(r1), iter(SegmentSampler(len(ds), seed=3))
    merged = [x for _ in range(3) for x in (next(i0), next(i1))]
    assert merged == [next(ig) for _ in range(6)]
    batches = validation_batches(corpus, "train", 3, 16, 2)
    assert [b[0].shape[0] for b in batches] == [2, 1]
