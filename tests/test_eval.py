import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vocoder.audio import write_wav
from vocoder.features import MelFrontEnd
from vocoder.report import write_html_report

ROOT = Path(__file__).resolve().parents[1]
RATE = 22050
HOP = 256

# Tiny architectures of the model kinds eval can be exercised with.
TINY = {
    "waveglow": ("vocoder.models.waveglow", "WaveGlow",
                 dict(n_flows=2, n_group=8, n_early_every=4, n_early_size=2, n_layers=2,
                      n_channels=8)),
    "teacher": ("vocoder.models.teacher", "Teacher",
                dict(n_layers=2, cycle_length=2, residual_channels=8, gate_channels=8,
                     skip_channels=8, cond_channels=8)),
}


def tiny_checkpoint(kind, path):
    """Save a tiny untrained model of ``kind``; None when that model is not importable."""
    from vocoder.checkpoint import make_checkpoint, save_checkpoint

    module, name, arch = TINY[kind]
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    model = cls(n_mels=80, hop_length=HOP, **arch)
    features = MelFrontEnd.from_preset("tacotron2").config.to_dict()
    save_checkpoint(make_checkpoint(model, features), path)
    return path


def tone(seconds, f0):
    t = np.arange(int(seconds * RATE)) / RATE
    audio = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 5)) * 0.2
    return audio.astype(np.float32)


def run_eval(*overrides):
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "vocoder.cli.eval", *overrides], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    checkpoints = {kind: tiny_checkpoint(kind, root / f"{kind}.pt") for kind in TINY}
    checkpoints = {kind: path for kind, path in checkpoints.items() if path is not None}
    if not checkpoints:
        pytest.skip("no model kind is importable yet")
    inputs, f0_dir = root / "in", root / "f0"
    f0_dir.mkdir()
    for name, f0 in (("low", 140.0), ("high", 230.0)):
        audio = tone(0.3, f0)
        write_wav(inputs / f"{name}.wav", audio, RATE)
    np.save(f0_dir / "low.npy", np.full(int(0.3 * RATE) // HOP + 1, 140.0, dtype=np.float32))
    (inputs / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    return root, checkpoints, inputs, f0_dir


def test_eval_writes_metrics_wavs_and_report(setup):
    root, checkpoints, inputs, f0_dir = setup
    kind = next(iter(checkpoints))  # WaveGlow when present: it synthesises in parallel
    output = root / "out"
    overrides = [f"checkpoint={checkpoints[kind]}", f"input={inputs}", f"output={output}",
                 f"f0_dir={f0_dir}", "report=true", "device=cpu"]
    if "teacher" in checkpoints:
        overrides.append(f"teacher={checkpoints['teacher']}")
    result = run_eval(*overrides)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "broken.wav" in warnings[0]

    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["kind"] == kind and metrics["mcd_includes_c0"] is False
    assert [row["name"] for row in metrics["files"]] == ["high", "low"]
    assert [Path(s["file"]).name for s in metrics["skipped"]] == ["broken.wav"]
    keys = ["log_mel_l1", "mr_stft", "mcd_db", "voicing_error"]
    if "teacher" in checkpoints:
        keys.append("teacher_nll")
    for row in metrics["files"]:
        for key in keys:
            assert math.isfinite(row[key]), (row["name"], key)
        assert row["f0_rmse_cents"] is None or math.isfinite(row["f0_rmse_cents"])
        audio, rate = sf.read(output / "wavs" / f"{row['name']}.wav")
        assert rate == RATE and audio.shape == (int(0.3 * RATE),)
    for key in keys:
        assert math.isfinite(metrics["mean"][key]), key
    sources = {row["name"]: row["f0_source"] for row in metrics["files"]}
    assert sources == {"low": "true", "high": "pyin"}
    assert "| **mean** |" in (output / "metrics.md").read_text()
    page = (output / "report.html").read_text()
    assert "wavs/low.wav" in page and f"mels/{kind}/high.png" in page


def test_eval_scores_given_synthesis_without_running_the_model(setup, tmp_path):
    """synthesis=DIR scores existing wavs: the reference scored against itself is at distance
    zero; a recording with no synthesised file is one warning and is left out."""
    root, checkpoints, inputs, _ = setup
    given = tmp_path / "given"
    given.mkdir()
    (given / "low.wav").write_bytes((inputs / "low.wav").read_bytes())
    output = tmp_path / "out"
    result = run_eval(f"checkpoint={next(iter(checkpoints.values()))}", f"input={inputs}",
                      f"output={output}", f"synthesis={given}")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert any("broken.wav" in w for w in warnings)
    assert any("high.wav" in w and "no synthesised file" in w for w in warnings)
    metrics = json.loads((output / "metrics.json").read_text())
    assert [row["name"] for row in metrics["files"]] == ["low"]
    row = metrics["files"][0]
    assert row["log_mel_l1"] < 1e-6 and row["mr_stft"] < 1e-6 and row["mcd_db"] < 1e-3
    assert row["voicing_error"] == 0.0
    assert row["synthesis_seconds"] is None and metrics["mean"]["real_time_factor"] is None
    assert metrics["synthesis"] == str(given)


def test_eval_given_synthesis_that_cannot_be_decoded_is_one_line(setup, tmp_path):
    root, checkpoints, inputs, _ = setup
    given = tmp_path / "given"
    given.mkdir()
    (given / "low.wav").write_bytes(b"RIFF\x00\x00not a wave file either")
    result = run_eval(f"checkpoint={next(iter(checkpoints.values()))}", f"input={inputs}",
                      f"output={tmp_path / 'out'}", f"synthesis={given}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert any("low.wav" in line and "cannot decode" in line for line in lines)
    assert lines[-1].startswith("error:") and "Traceback" not in result.stderr


def test_eval_without_a_readable_file_fails_in_one_line(setup, tmp_path):
    root, checkpoints, _, _ = setup
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.flac").write_bytes(b"")
    result = run_eval(f"checkpoint={next(iter(checkpoints.values()))}",
                      f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("warning:") and "empty.flac" in lines[0]
    assert lines[-1].startswith("error:") and len(lines) == 2


def test_html_report_takes_any_subset_of_models(tmp_path):
    reference, model_a = tmp_path / "ref", tmp_path / "a"
    for name in ("one", "two"):
        write_wav(reference / f"{name}.wav", tone(0.2, 180.0), RATE)
    write_wav(model_a / "one.wav", tone(0.2, 190.0), RATE)  # "two" missing for model a
    bench = tmp_path / "chart.png"
    bench.write_bytes(b"\x89PNG\r\n\x1a\n")
    metrics = {"a": {"files": [{"name": "one", "mcd_db": 3.5}], "mean": {"mcd_db": 3.5}}}
    speed = {"rows": [{"model": "student", "device": "cpu", "dtype": "fp32", "batch": 1,
                       "samples_per_s": 754859.2, "real_time_factor": 0.0292,
                       "macs_per_sample": 31100.0, "fraction_of_floor": 0.28}],
             "ratios": {"student_over_waveglow": 2.99}, "environment": {"cpu": "Test CPU"}}
    page = write_html_report(tmp_path / "report", ["one", "two"],
                             {"a": model_a, "b": tmp_path / "nowhere"}, reference,
                             bench_png=bench, metrics=metrics, bench=speed)
    text = page.read_text()
    assert "754,859" in text and "28%" in text and "student over waveglow: 3.0x" in text
    assert "Test CPU" in text
    assert (tmp_path / "report" / "mels" / "reference" / "two.png").is_file()
    assert (tmp_path / "report" / "mels" / "a" / "one.png").is_file()
    assert (tmp_path / "report" / "bench.png").is_file()
    assert "../a/one.wav" in text and text.count("missing") >= 3 and "3.5" in text


def test_summary_pools_pitch_errors_over_frames_voiced_in_both():
    from vocoder.evaluation import summarise

    rows = [
        dict(seconds=1.0, frames=10, voicing_error=0.1, voiced_both=8, f0_rmse_cents=30.0,
             gross_errors=2, gross_pitch_error=0.25, f0_rmse_fine_cents=10.0),
        dict(seconds=1.0, frames=10, voicing_error=0.3, voiced_both=2, f0_rmse_cents=60.0,
             gross_errors=0, gross_pitch_error=0.0, f0_rmse_fine_cents=60.0),
        dict(seconds=1.0, frames=10, voicing_error=1.0, voiced_both=0,
             f0_rmse_cents=float("nan"), gross_errors=0, gross_pitch_error=float("nan"),
             f0_rmse_fine_cents=float("nan")),
    ]
    mean = summarise(rows)
    assert mean["voiced_both"] == 10 and mean["frames"] == 30
    assert mean["gross_pitch_error"] == pytest.approx(2 / 10)  # not the mean of 0.25 and 0
    assert mean["f0_rmse_cents"] == pytest.approx(((8 * 30**2 + 2 * 60**2) / 10) ** 0.5)
    # the fine RMSE pools the 6 + 2 frames that are not gross errors
    assert mean["f0_rmse_fine_cents"] == pytest.approx(((6 * 10**2 + 2 * 60**2) / 8) ** 0.5)
    assert mean["voicing_error"] == pytest.approx(1.4 / 3)
