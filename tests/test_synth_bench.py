"""vocoder-synth and vocoder-bench on tiny checkpoints of every kind."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vocoder.checkpoint import make_checkpoint, save_checkpoint
from vocoder.features import MelFrontEnd
from vocoder.models import KINDS, load_model, model_from_arch
from vocoder.synthesis import check_mel, synthesize_long

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "teacher": {"n_layers": 2, "cycle_length": 2, "residual_channels": 4, "gate_channels": 8,
                "skip_channels": 4, "kernel_size": 2, "cond_channels": 4},
    "student": {"flow_layers": [2, 2], "residual_channels": 4, "gate_channels": 8,
                "skip_channels": 4, "kernel_size": 2, "cond_channels": 4},
    "waveglow": {"n_flows": 2, "n_group": 4, "n_early_every": 1, "n_early_size": 2,
                 "n_layers": 2, "n_channels": 4},
}


def _checkpoint(kind, path, perturb=False):
    fe = MelFrontEnd.from_preset("tacotron2")
    model = model_from_arch(kind, fe.n_mels, fe.hop_length, TINY[kind])
    if perturb:  # move zero-initialised output layers away from the identity
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(make_checkpoint(model, fe.config.to_dict()), path)
    return path


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=REPO)


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_synthesizes_frames_times_hop(kind, tmp_path):
    model = load_model(_checkpoint(kind, tmp_path / f"{kind}.pt"))
    # every submodule, those that preparing for inference built included
    assert model.kind == kind and not any(m.training for m in model.modules())
    mel = torch.full((2, 80, 5), -6.0)
    with torch.no_grad():
        audio = model.synthesize(mel)
    assert audio.shape == (2, 5 * 256) and torch.isfinite(audio).all()


@pytest.mark.parametrize("kind", ["student", "waveglow"])
def test_chunked_synthesis_matches_whole_away_from_seams(kind, tmp_path):
    """At sigma 0 the parallel models are deterministic; chunks that see enough context agree
    with the whole-utterance pass outside the cross-faded seams."""
    model = load_model(_checkpoint(kind, tmp_path / f"{kind}.pt", perturb=True))
    mel = torch.randn(1, 80, 40) - 5.0
    whole = synthesize_long(model, mel, sigma=0.0, chunk_frames=0)
    chunked = synthesize_long(model, mel, sigma=0.0, chunk_frames=16, overlap_frames=4)
    assert chunked.shape == whole.shape == (1, 40 * 256)
    assert whole.abs().max() > 1e-3  # not trivially zero
    away = torch.ones(40 * 256, dtype=torch.bool)
    for boundary in (13, 27):  # 3 equal chunks of 40 frames
        away[(boundary - 4) * 256:(boundary + 4) * 256] = False
    torch.testing.assert_close(chunked[0, away], whole[0, away], atol=1e-4, rtol=1e-4)
    # inside the seams the cross-fade of two near-identical pieces stays close too
    assert (chunked - whole).abs().max() < 0.25 * whole.abs().max()


def test_synth_cli_mels_and_audio_with_bad_inputs(tmp_path):
    ckpt = _checkpoint("waveglow", tmp_path / "wg.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    fe = MelFrontEnd.from_preset("tacotron2")
    t = np.arange(4000) / 22050
    wav = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    sf.write(inputs / "speech.wav", wav, 22050)
    np.save(inputs / "good.npy", fe(torch.from_numpy(wav)).numpy())
    np.save(inputs / "bands.npy", np.zeros((64, 10), np.float32) - 5)
    np.save(inputs / "log10.npy", fe(torch.from_numpy(wav)).numpy() / np.log(10))
    (inputs / "broken.wav").write_bytes(b"RIFFjunk")
    out = tmp_path / "out"
    proc = _run("vocoder.cli.synth", f"checkpoint={ckpt}", f"input={inputs}", f"output={out}",
                "progress=false")
    assert proc.returncode == 1  # some inputs failed
    assert sorted(p.name for p in out.iterdir()) == ["good.wav", "speech.wav"]
    frames = fe.num_frames(4000)
    for name in ("good.wav", "speech.wav"):
        data, sr = sf.read(out / name, dtype="int16")
        assert sr == 22050 and len(data) == frames * 256
        assert sf.info(out / name).subtype == "PCM_16"
    err = proc.stderr
    assert "bands.npy: mel has 64 bands" in err
    assert "log10.npy" in err and "log10" in err
    assert "broken.wav" in err and "Traceback" not in err
    assert "RTF" in proc.stdout


def test_synth_cli_copy_synthesis_in_bf16(tmp_path):
    """The model's front end travels with it through .to(dtype) but stays float32, so audio
    inputs still become mels when the model runs in half precision."""
    ckpt = _checkpoint("student", tmp_path / "student.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    t = np.arange(4000) / 16000  # another rate: resampled on the way in
    sf.write(inputs / "tone.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    out = tmp_path / "out"
    proc = _run("vocoder.cli.synth", f"checkpoint={ckpt}", f"input={inputs}", f"output={out}",
                "dtype=bf16", "progress=false")
    assert proc.returncode == 0, proc.stderr
    fe = MelFrontEnd.from_preset("tacotron2")
    data, sr = sf.read(out / "tone.wav", dtype="int16")
    assert sr == 22050 and len(data) == fe.num_frames(round(4000 * 22050 / 16000)) * 256


def test_front_end_stays_float32_and_reads_any_float_input():
    fe = MelFrontEnd.from_preset("tacotron2")
    audio = 0.1 * torch.randn(3000)
    expected = fe(audio)
    fe.to(torch.bfloat16)
    assert fe.mel_basis.dtype == fe.window.dtype == torch.float32
    assert torch.equal(fe(audio.double()), expected)


def test_check_mel_raises_values_just_below_the_floor():
    """Predicted mels may dip under ln(1e-5); they are raised to it, not refused."""
    fe = MelFrontEnd.from_preset("tacotron2")
    mel = fe(0.1 * torch.randn(8000)).numpy()
    mel[:, :5] = -12.6
    checked = check_mel(mel, Path("predicted.npy"), fe)
    assert checked.min() == pytest.approx(np.log(1e-5))
    assert np.array_equal(checked[:, 5:], mel[:, 5:])


def test_check_mel_explains_layout_and_scale():
    fe = MelFrontEnd.from_preset("tacotron2")
    with pytest.raises(Exception, match=r"\[frames, n_mels\]"):
        check_mel(np.zeros((30, 80), np.float32) - 5, Path("t.npy"), fe)
    with pytest.raises(Exception, match="dB"):
        check_mel(np.full((80, 30), -100.0, np.float32), Path("db.npy"), fe)
    normalised = np.random.default_rng(0).standard_normal((80, 200)).astype(np.float32)
    with pytest.raises(Exception, match="normalised"):
        check_mel(normalised, Path("n.npy"), fe)
    real = fe(torch.randn(8000) * 0.1).numpy()
    assert check_mel(real, Path("ok.npy"), fe).shape == real.shape


def test_bench_cli_writes_json_table_and_chart(tmp_path):
    ckpts = {k: _checkpoint(k, tmp_path / f"{k}.pt") for k in KINDS}
    out = tmp_path / "bench"
    proc = _run("vocoder.cli.bench", f"output={out}", "device=cpu", "seconds=0.1",
                "teacher_seconds=0.02", "repeats=2", *(f"{k}={v}" for k, v in ckpts.items()))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "bench.json").read_text())
    assert [r["model"] for r in data["rows"]] == ["teacher", "student", "waveglow"]
    for r in data["rows"]:
        for key in ("samples_per_s", "real_time_factor", "peak_memory_mb", "parameters",
                    "macs_per_sample", "bytes_per_sample", "batch", "audio_seconds"):
            assert np.isfinite(r[key]) and r[key] > 0, key
        assert len(r["times_s"]) == 2
        # the binding floor is the lower of the arithmetic and the bandwidth one
        assert r["floor_samples_per_s"] == min(r["matmul_floor_samples_per_s"],
                                               r["bandwidth_floor_samples_per_s"])
    assert set(data["ratios"]) == {"student_over_teacher", "student_over_waveglow"}
    assert data["environment"]["threads"] >= 1 and data["environment"]["torch"]
    assert "| teacher |" in (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 1000


def test_op_counter_counts_bytes_once_and_macs_in_every_form():
    from torch.utils.flop_counter import FlopCounterMode

    from vocoder.bench.counting import _OpCounter

    a, b, out = torch.ones(1000), torch.ones(1000), torch.empty(1000)
    counter = _OpCounter()
    with counter.mode:
        a + b  # reads 2 x 4000 bytes, writes 4000
        a.view(10, 100).t()  # views move nothing
        torch.add(a, b, out=out)  # the out= tensor is written, not read
    assert counter.bytes == 2 * 12000 and counter.macs == 0

    m, k, n = torch.randn(5, 3), torch.randn(3, 7), torch.empty(5, 7)
    batch1, batch2, blocks = torch.randn(4, 5, 3), torch.randn(4, 3, 2), torch.empty(4, 5, 2)
    counter = _OpCounter()
    with counter.mode:
        n.addmm_(m, k)  # in place: 5 * 3 * 7
        torch.baddbmm(blocks, batch1, batch2, out=blocks)  # out=: 4 * 5 * 3 * 2
        torch.mv(m, torch.randn(3))  # 5 * 3
    assert counter.macs == 105 + 120 + 15

    # convolutions against torch's own FLOP counter (grouped, dilated, transposed)
    x = torch.randn(2, 8, 50)
    for conv in (torch.nn.Conv1d(8, 12, 3, dilation=2, groups=2),
                 torch.nn.ConvTranspose1d(8, 6, 16, stride=8)):
        counter = _OpCounter()
        with torch.no_grad(), counter.mode, FlopCounterMode(display=False) as reference:
            conv(x)
        assert counter.macs == reference.get_total_flops() / 2 > 0


def test_macs_per_sample_count_the_inference_path():
    from torch.utils.flop_counter import FlopCounterMode

    from vocoder.bench import count_macs_per_sample

    fe = MelFrontEnd.from_preset("tacotron2")
    frames, samples = 4, 4 * fe.hop_length
    mel, x = torch.full((1, fe.n_mels, frames), -5.0), 0.1 * torch.randn(1, 4 * fe.hop_length)

    def training_form(model):
        with torch.no_grad(), FlopCounterMode(display=False) as reference:
            model.encode(x, mel) if model.kind == "waveglow" else model(x, mel)
        return reference.get_total_flops() / 2 / samples

    # WaveGlow's decode as timed (fused for inference) does its encode's arithmetic (the
    # inverse 1x1s are cached) less, per WN and time step of n_group samples: the first
    # layer's k taps reading n_in + 1 channels instead of C, the skip halves of the 1x1s
    # emitting 2 n_in channels instead of C, and no `end` (C -> 2 n_in).
    waveglow = model_from_arch("waveglow", fe.n_mels, fe.hop_length, TINY["waveglow"]).eval()
    saved = 0
    for coupling in waveglow.couplings:
        n_in, net = coupling.n_half, coupling.net
        c, k = net.n_channels, net.in_layers[0].kernel_size[0]
        saved += k * 2 * c * (c - n_in - 1) + net.n_layers * c * (c - 2 * n_in) + c * 2 * n_in
    assert saved > 0
    assert count_macs_per_sample(waveglow) == training_form(waveglow) - saved / waveglow.n_group
    # the student's baked flows project the mel per frame, not per sample: less arithmetic,
    # the same amount per sample whatever the length
    arch = {**TINY["student"], "cond_channels": 32}
    student = model_from_arch("student", fe.n_mels, fe.hop_length, arch).eval()
    lean = count_macs_per_sample(student)
    assert 0 < lean < training_form(student)
    assert count_macs_per_sample(student, frames=8) == lean


def test_bytes_per_sample_invariants():
    from vocoder.bench import count_bytes_per_sample

    fe = MelFrontEnd.from_preset("tacotron2")
    student = model_from_arch("student", fe.n_mels, fe.hop_length, TINY["student"])
    per_sample = count_bytes_per_sample(student)
    # marginal bytes of a parallel pass do not depend on the length counted over...
    assert count_bytes_per_sample(student, frames=2) == pytest.approx(per_sample, rel=0.05)
    # ...and halve with 2-byte elements
    assert count_bytes_per_sample(student, bytes_per_element=2) == pytest.approx(per_sample / 2)
    teacher = model_from_arch("teacher", fe.n_mels, fe.hop_length, TINY["teacher"])
    # every sequential step reads the whole WaveNet's weights; a batch shares them
    weights = 4 * sum(p.numel() for p in teacher.wavenet.parameters())
    single, batched = count_bytes_per_sample(teacher), count_bytes_per_sample(teacher, batch=4)
    assert single > weights and batched < single


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_without_audio_scale_loads_as_raw_amplitude(kind):
    """Checkpoints from before audio_scale existed were trained on raw amplitudes (1.0)."""
    from vocoder.models import model_from_checkpoint

    fe = MelFrontEnd.from_preset("tacotron2")
    model = model_from_arch(kind, fe.n_mels, fe.hop_length, TINY[kind])
    ckpt = make_checkpoint(model, fe.config.to_dict())
    assert model_from_checkpoint(ckpt).audio_scale == model.audio_scale == 0.1
    del ckpt["arch"]["audio_scale"]
    assert model_from_checkpoint(ckpt).audio_scale == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_a_prepared_model_is_refused_by_make_checkpoint(kind):
    """prepare_for_inference removes weight norm and fuses layers; a checkpoint of that layout
    would not load, so saving one is refused with a message instead of written."""
    from vocoder.checkpoint import CheckpointError
    from vocoder.models import model_from_checkpoint

    fe = MelFrontEnd.from_preset("tacotron2")
    model = model_from_arch(kind, fe.n_mels, fe.hop_length, TINY[kind])
    before = make_checkpoint(model, fe.config.to_dict())
    model.eval().prepare_for_inference()
    with pytest.raises(CheckpointError, match=f"cannot save this {kind}: prepare_for_inference"):
        make_checkpoint(model, fe.config.to_dict())
    # The checkpoint taken before preparing still rebuilds a model that synthesises like it.
    mel = torch.randn(1, fe.n_mels, 3)
    rebuilt = model_from_checkpoint(before).eval().prepare_for_inference()
    torch.manual_seed(1)
    want = model.synthesize(mel)
    torch.manual_seed(1)
    torch.testing.assert_close(rebuilt.synthesize(mel), want)


@pytest.mark.parametrize("kind", ["student", "waveglow"])
def test_precision_check_measures_distance_to_fp32(kind):
    """Same mel and noise: fp32 against itself is exactly zero, bf16 (8 significant bits) is
    off by a small, nonzero amount."""
    from vocoder.bench import precision_check

    fe = MelFrontEnd.from_preset("tacotron2")
    torch.manual_seed(0)
    model = model_from_arch(kind, fe.n_mels, fe.hop_length, TINY[kind])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval().prepare_for_inference()
    before = [p.detach().clone() for p in model.parameters()]
    same = precision_check(model, "fp32", torch.device("cpu"), fe, seconds=0.1)
    assert same == {"rel_audio_error_vs_fp32": 0.0, "log_mel_l1_vs_fp32": 0.0}
    low = precision_check(model, "bf16", torch.device("cpu"), fe, seconds=0.1)
    assert 1e-4 < low["rel_audio_error_vs_fp32"] < 0.1
    assert 0.0 < low["log_mel_l1_vs_fp32"] < 1.0
    assert all(p.dtype == torch.float32 and torch.equal(p, b)
               for p, b in zip(model.parameters(), before, strict=True))


def test_synth_cli_nan_empty_and_missing_inputs(tmp_path):
    ckpt = _checkpoint("student", tmp_path / "st.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    good = np.full((80, 12), -6.0, np.float32)
    np.save(inputs / "good.npy", good)
    nan = good.copy()
    nan[3, 4] = np.nan
    np.save(inputs / "nan.npy", nan)
    (inputs / "empty.npy").write_bytes(b"")
    (inputs / "empty.wav").write_bytes(b"")
    out = tmp_path / "out"
    proc = _run("vocoder.cli.synth", f"checkpoint={ckpt}", f"input={inputs}", f"output={out}",
                "progress=false")
    assert proc.returncode == 1
    assert sorted(p.name for p in out.iterdir()) == ["good.wav"]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3
    assert any("nan.npy" in w and "NaN" in w for w in warnings)
    assert any("empty.npy" in w for w in warnings) and any("empty.wav" in w for w in warnings)
    missing = _run("vocoder.cli.synth", f"checkpoint={ckpt}", f"input={tmp_path / 'nope'}",
                   f"output={out}")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: input not found"]
    bad_ckpt = _run("vocoder.cli.synth", f"checkpoint={tmp_path / 'in' / 'good.npy'}",
                    f"input={inputs}", f"output={out}")
    assert bad_ckpt.returncode == 2 and "not a readable checkpoint" in bad_ckpt.stderr
    assert len(bad_ckpt.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["student", "waveglow"])
def test_synthesis_traces_into_one_graph_for_torch_compile(kind):
    # What `vocoder-bench compile=true` and users' torch.compile get: dynamo's trace of the
    # whole synthesis (traced only, no code generated), with no graph break that would leave
    # parts of the network to run eagerly. Batch 2 as well: in-place ops into strided views
    # of a batch are where breaks came from.
    fe = MelFrontEnd.from_preset("tacotron2")
    model = model_from_arch(kind, fe.n_mels, fe.hop_length, TINY[kind])
    model.eval().prepare_for_inference()
    for batch in (1, 2):
        mel = torch.full((batch, fe.n_mels, 3), -5.0)
        with torch.no_grad():
            model.synthesize(mel)  # the lazily built caches exist, as in the bench
            torch._dynamo.reset()
            explained = torch._dynamo.explain(model.synthesize)(mel)
        reasons = [r.reason.splitlines()[0] for r in explained.break_reasons]
        assert explained.graph_count == 1 and explained.graph_break_count == 0, reasons
        assert sum(len(g.graph.nodes) for g in explained.graphs) > 50
    torch._dynamo.reset()


def test_synth_cli_streams_in_chunks_and_runs_onnxruntime(tmp_path):
    ckpt = _checkpoint("student", tmp_path / "student.pt", perturb=True)
    inputs = tmp_path / "in"
    inputs.mkdir()
    fe = MelFrontEnd.from_preset("tacotron2")
    mel = fe(torch.from_numpy((0.3 * np.sin(np.arange(6000) / 10)).astype(np.float32)))
    np.save(inputs / "a.npy", mel.numpy())
    frames = mel.shape[-1]
    outs = {}
    for name, extra in (("whole", []), ("stream", ["stream=true", "chunk_frames=3"])):
        proc = _run("vocoder.cli.synth", f"checkpoint={ckpt}", f"input={inputs}",
                    f"output={tmp_path / name}", "progress=false", "seed=3", *extra)
        assert proc.returncode == 0, proc.stderr
        outs[name], _ = sf.read(tmp_path / name / "a.wav", dtype="float32")
        assert len(outs[name]) == frames * 256
    assert "first audio after" in proc.stdout
    assert np.abs(outs["stream"]).max() > 1e-3
    proc = _run("vocoder.cli.synth", f"checkpoint={ckpt}", f"input={inputs}",
                f"output={tmp_path / 'bad'}", "stream=true", "chunk_frames=0")
    assert proc.returncode == 2 and "chunk_frames must be positive" in proc.stderr
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from vocoder.export import export_onnx

    graph = export_onnx(load_model(ckpt), tmp_path / "student.onnx")
    proc = _run("vocoder.cli.synth", f"checkpoint={graph}", f"input={inputs}",
                f"output={tmp_path / 'onnx'}", "progress=false", "backend=onnxruntime")
    assert proc.returncode == 0, proc.stderr
    audio, _ = sf.read(tmp_path / "onnx" / "a.wav", dtype="float32")
    assert len(audio) == frames * 256 and np.abs(audio).max() > 1e-3
    proc = _run("vocoder.cli.synth", f"checkpoint={graph}", f"input={inputs}",
                f"output={tmp_path / 'onnx2'}", "backend=onnxruntime", "stream=true",
                "chunk_frames=2")
    assert proc.returncode == 2 and "without streaming" in proc.stderr


def test_bench_cli_times_onnxruntime_and_streams(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ckpt = _checkpoint("student", tmp_path / "student.pt")
    out = tmp_path / "bench"
    proc = _run("vocoder.cli.bench", f"output={out}", "device=cpu", "seconds=0.1",
                "repeats=2", "models=[student]", f"student={ckpt}",
                "backend=[torch,onnxruntime]", "stream_chunks=[1,3]")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "bench.json").read_text())
    assert [(r["model"], r["backend"]) for r in data["rows"]] == [
        ("student", "torch"), ("student", "onnxruntime")]
    assert all(r["samples_per_s"] > 0 for r in data["rows"])
    streams = data["streaming"]
    assert [s["chunk_frames"] for s in streams] == [1, 3]
    for s in streams:
        assert s["exact"] and s["lookahead_frames"] == 3
        # The first samples are final once lookahead + 1 frames have arrived.
        needed = -(-4 // s["chunk_frames"]) * s["chunk_frames"]
        assert s["algorithmic_latency_ms"] == pytest.approx(1000 * needed * 256 / 22050)
        assert s["first_audio_ms"] > 0 and s["real_time_factor"] > 0
    text = (out / "bench.md").read_text()
    assert "| student (onnxruntime) |" in text and "| chunk frames |" in text
