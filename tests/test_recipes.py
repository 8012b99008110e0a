"""The recipes end to end at toy size: every stage runs and leaves its outputs."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
MODELS = ("teacher", "student", "waveglow")


def _bash(*args, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout)


def _check_outputs(exp: Path, n_test: int, models=MODELS):
    for m in models:
        assert (exp / m / "checkpoints" / "last.pt").is_file(), m
        metrics = json.loads((exp / "eval" / m / "metrics.json").read_text())
        assert len(metrics["files"]) == n_test
        for key in ("log_mel_l1", "mr_stft", "mcd_db"):
            assert np.isfinite(metrics["mean"][key]), (m, key)
    bench = json.loads((exp / "bench" / "bench.json").read_text())
    assert [r["model"] for r in bench["rows"]] == list(models)
    assert set(bench["ratios"]) == {"student_over_teacher", "student_over_waveglow"}
    html = (exp / "report.html").read_text()
    for m in models:
        assert m in html
    assert "bench.png" in html
    # the speed table, with the measured student rate
    assert "student over waveglow" in html
    student = next(r for r in bench["rows"] if r["model"] == "student")
    assert f"{student['samples_per_s']:,.0f}" in html


def test_demo_recipe_ci_size(tmp_path):
    exp = tmp_path / "demo"
    proc = _bash("recipes/demo/run.sh", "--size", "ci", "--exp", str(exp))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    test_wavs = sorted(p.name for p in (exp / "test_audio").glob("*.wav"))
    assert test_wavs
    for m in MODELS:
        assert sorted(p.name for p in (exp / "synth" / m).glob("*.wav")) == test_wavs
        for name in test_wavs:
            ref = sf.info(exp / "test_audio" / name)
            out = sf.info(exp / "synth" / m / name)
            assert out.samplerate == 22050 and out.subtype == "PCM_16"
            assert out.frames == (ref.frames // 256 + 1) * 256  # frames * hop
    _check_outputs(exp, len(test_wavs))
    # the true F0 of the demo corpus was used as the reference
    metrics = json.loads((exp / "eval" / "waveglow" / "metrics.json").read_text())
    assert {row["f0_source"] for row in metrics["files"]} == {"true"}
    # stages run alone, and a rerun resumes instead of starting over
    again = _bash("recipes/demo/run.sh", "--size", "ci", "--exp", str(exp), "--stage", "1",
                  "--stop-stage", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already at step" in again.stdout


def _fake_ljspeech(root: Path, n: int = 14):
    (root / "wavs").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "metadata.csv", "w") as f:
        for i in range(n):
            uid = f"LJ001-{i + 1:04d}"
            f.write(f"{uid}|Printing, in the only sense.|Printing, in the only sense.\n")
            t = np.arange(int(0.6 * 22050)) / 22050
            f0 = 110 + 20 * i
            x = 0.3 * np.sin(2 * np.pi * f0 * t) + 0.01 * rng.standard_normal(t.size)
            sf.write(root / "wavs" / f"{uid}.wav", x.astype(np.float32), 22050, subtype="PCM_16")


def test_ljspeech_recipe_on_a_fake_layout_with_debug_sizes(tmp_path):
    root = tmp_path / "LJSpeech-1.1"
    _fake_ljspeech(root)
    exp = tmp_path / "lj"
    proc = _bash("recipes/ljspeech/run.sh", str(root), "--experiment", "debug", "--device",
                 "cpu", "--exp", str(exp), "--", "trainer.max_steps=3", "trainer.val_every=3",
                 "trainer.ckpt_every=3")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads(next((exp / "data").glob("ljspeech-*/manifest.json")).read_text())
    splits = {e["name"]: e["split"] for e in manifest["entries"]}
    assert splits["LJ001-0014"] == "test" and splits["LJ001-0013"] == "valid"
    assert sum(s == "train" for s in splits.values()) == 12
    assert sorted(p.name for p in (exp / "test_audio").glob("*.wav")) == ["LJ001-0014.wav"]
    _check_outputs(exp, 1, models=("teacher", "student", "waveglow"))


def test_gpu_measurement_script_runs_on_cpu_at_debug_size(tmp_path):
    # The staged GPU measurement (issue 9) must work the first time a GPU is lent: run every
    # stage here on CPU with tiny settings and check that each left its results.
    import tarfile

    out = tmp_path / "gpu"
    env = dict(os.environ, OMP_NUM_THREADS="1", EXPERIMENT="debug", STEPS="2",
               SECONDS_OF_AUDIO="0.1", TEACHER_SECONDS="0.02", REPEATS="1",
               BUNDLE=str(tmp_path / "gpu.tgz"))
    proc = subprocess.run(["bash", "recipes/gpu/run.sh", str(out)], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = json.loads((out / "bench-eager" / "bench.json").read_text())
    assert [(r["model"], r["batch"]) for r in bench["rows"]] == [
        (m, b) for m in ("student", "waveglow") for b in (1, 8)]
    bench = json.loads((out / "bench-teacher" / "bench.json").read_text())
    assert [(r["model"], r["batch"]) for r in bench["rows"]] == [("teacher", 1), ("teacher", 8)]
    for run in ("teacher-fp32", "teacher-bf16", "student-none", "student-bf16",
                "waveglow-bf16"):
        rows = [json.loads(line) for line in (out / f"train-{run}" / "metrics.jsonl").open()]
        assert any(r["kind"] == "train" and r["samples_per_s"] > 0 for r in rows), run
    assert "training throughput" in proc.stdout
    stages = (out / "stages.txt").read_text().split("\n")
    assert [line.split()[:2] for line in stages if line] == [
        [stage, "rc=0"] for stage in ("check", "bench", "compiled", "train")]
    # the targets read from both bench runs (fp32 on CPU)
    assert "student fp32, batch 1, eager" in proc.stdout
    assert "student / teacher's cached sampling" in proc.stdout
    with tarfile.open(tmp_path / "gpu.tgz") as tar:
        names = tar.getnames()
    assert "./bench-eager/bench.json" in names and "./train-student-bf16/metrics.jsonl" in names
    assert not any(n.endswith(".pt") or "/data/" in n for n in names)


def test_gpu_measurement_script_goes_on_after_a_stage_runs_out_of_time(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, STAGE_LIMIT="1", EXPERIMENT="debug")
    proc = subprocess.run(["bash", "recipes/gpu/run.sh", str(out), "train", "compiled"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 1
    stages = (out / "stages.txt").read_text().split("\n")
    assert [line.split()[:2] for line in stages if line] == [["train", "rc=124"],
                                                             ["compiled", "rc=0"]]
    assert "failed stages: train" in proc.stdout
    proc = subprocess.run(["bash", "recipes/gpu/run.sh", str(out), "tests"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "unknown stage tests" in proc.stdout
