"""ONNX export (vocoder/export.py, vocoder-export): the graph run by onnxruntime computes what
``model.synthesize(mel, z=z)`` does, for any batch and length; the teacher is refused in one
line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import vocoder
from vocoder.checkpoint import make_checkpoint, save_checkpoint
from vocoder.data.demo import generate_utterance
from vocoder.errors import VocoderError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from vocoder.export import OnnxVocoder, export_onnx  # noqa: E402

HOP = 256
# Small enough to export in seconds; every kind of layer is still there (WaveGlow: early
# outputs, 1x1 inverses, WN couplings; student: two flows with dilations).
SMALL = {"student": dict(flow_layers=[3, 2], residual_channels=8, gate_channels=8,
                         skip_channels=8, cond_channels=8),
         "waveglow": dict(n_flows=3, n_early_every=2, n_early_size=2, n_layers=2,
                          n_channels=8)}


def _model(kind):
    # "student+excitation": the pitch predictor and the phase integration go into the graph.
    kind, _, extra = kind.partition("+")
    arch = dict(SMALL[kind], **({"excitation": True} if extra else {}))
    model = vocoder.build_model(kind, preset="tacotron2", experiment="debug", **arch).eval()
    with torch.no_grad():  # a fresh student is an identity: give it some weights
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _speech_mel(model, frames, batch=2):
    mels = []
    for i in range(batch):
        audio = torch.from_numpy(generate_utterance(i + 3).audio).float()
        mels.append(model.features(audio[None, :frames * HOP])[..., :frames])
    return torch.cat(mels)


@pytest.fixture(scope="module", params=["student", "waveglow", "student+excitation"])
def exported(request, tmp_path_factory):
    torch.manual_seed(1)
    model = _model(request.param)
    path = export_onnx(model, tmp_path_factory.mktemp(request.param) / "model.onnx")
    return model, path


def test_onnxruntime_matches_pytorch_for_two_lengths_and_batch_two(exported):
    model, path = exported
    graph = OnnxVocoder(path)
    assert (graph.kind, graph.n_mels, graph.hop_length) == (model.kind, 80, HOP)
    assert graph.sigma == pytest.approx(model.sigma if model.kind == "waveglow" else 1.0)
    assert graph.features.config == model.features.config
    for frames in (9, 40):  # neither is the example length the graph was traced with
        mel = _speech_mel(model, frames)
        z = torch.randn(2, frames * HOP)
        expected = model.synthesize(mel, z=z)
        got = graph.synthesize(mel, z=z)
        assert got.shape == expected.shape == (2, frames * HOP)
        assert expected.abs().max() > 1e-3
        error = (got - expected).abs().max() / expected.abs().max()
        assert error < 1e-3, error
    # One utterance of a batch does not depend on the other.
    torch.testing.assert_close(graph.synthesize(mel[:1], z=z[:1]), got[:1], rtol=0, atol=1e-5)


def test_sigma_is_fixed_at_export(exported, tmp_path):
    model, path = exported
    graph = OnnxVocoder(path)
    mel = _speech_mel(model, 5, batch=1)
    with pytest.raises(VocoderError, match="exported with sigma"):
        graph.synthesize(mel, sigma=graph.sigma / 2)
    with pytest.raises(ValueError, match="z must be"):
        graph.synthesize(mel, z=torch.randn(1, 7))


def test_teacher_and_non_graphs_are_refused_in_one_line(tmp_path):
    teacher = vocoder.build_model("teacher", experiment="debug")
    with pytest.raises(VocoderError, match="teacher cannot be exported"):
        export_onnx(teacher, tmp_path / "t.onnx")
    assert not (tmp_path / "t.onnx").exists()
    (tmp_path / "bad.onnx").write_text("not a graph")
    with pytest.raises(VocoderError, match="bad.onnx: not a loadable ONNX graph"):
        OnnxVocoder(tmp_path / "bad.onnx")


def test_export_cli_refuses_a_teacher_in_one_line_and_writes_nothing(tmp_path):
    teacher = vocoder.build_model("teacher", experiment="debug")
    save_checkpoint(make_checkpoint(teacher, teacher.features.config.to_dict()),
                    tmp_path / "teacher.pt")
    out = tmp_path / "t.onnx"
    result = subprocess.run([sys.executable, "-m", "vocoder.cli.export",
                             f"checkpoint={tmp_path / 'teacher.pt'}", f"output={out}"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "teacher cannot be exported" in \
        result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "teacher.pt"]
    result = subprocess.run([sys.executable, "-m", "vocoder.cli.export", "checkpoint=x.pt"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "missing output=" in result.stderr


def test_export_cli_writes_a_checked_graph(tmp_path):
    model = vocoder.build_model("student", experiment="debug", **SMALL["student"])
    save_checkpoint(make_checkpoint(model, model.features.config.to_dict()),
                    tmp_path / "student.pt")
    out = tmp_path / "student.onnx"
    result = subprocess.run([sys.executable, "-m", "vocoder.cli.export",
                             f"checkpoint={tmp_path / 'student.pt'}", f"output={out}",
                             "sigma=0.5"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime matches PyTorch" in result.stdout
    assert OnnxVocoder(out).sigma == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.onnx", "student.pt"]
