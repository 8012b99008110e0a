"""What only a GPU can check (issue 9): the CUDA paths give the CPU's results.

Skipped where no CUDA device is visible, as in CI. On a lent GPU, `recipes/gpu/run.sh`'s
`check` stage runs this module first. `VOCODER_TEST_DEVICE=cpu` runs the same tests (those
that need CUDA itself excepted) on the CPU, to try them out where there is no GPU.

The models are the `debug` experiment's sizes with their output layers perturbed away from
the identity, so every flow and coupling changes the signal.
"""

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from vocoder.bench import precision_check
from vocoder.checkpoint import make_checkpoint, save_checkpoint
from vocoder.devices import set_tf32
from vocoder.features import MelFrontEnd
from vocoder.models import load_model, model_from_arch

DEVICE = torch.device(os.environ.get("VOCODER_TEST_DEVICE", "cuda"))
REPO = Path(__file__).resolve().parents[1]
ARCH = OmegaConf.to_container(OmegaConf.load(REPO / "vocoder/conf/experiment/debug.yaml").arch)
FEATURES = MelFrontEnd.from_preset("tacotron2")

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="no CUDA device")
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA itself")


@pytest.fixture(autouse=True)
def _exact_fp32():
    set_tf32(False)
    yield
    set_tf32(False)


def _model(kind: str, inference: bool = True):
    torch.manual_seed(0)
    model = model_from_arch(kind, FEATURES.n_mels, FEATURES.hop_length, ARCH[kind])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.prepare_for_inference().eval() if inference else model


def _inputs(batch: int, frames: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    mel = torch.rand(batch, FEATURES.n_mels, frames, generator=gen) * 8.0 - 8.0
    z = torch.randn(batch, frames * FEATURES.hop_length, generator=gen)
    return mel, z


def _from_noise(model, mel, z, **kw):
    with torch.no_grad():
        if model.kind == "waveglow":
            return model.decode(z * model.sigma, mel)
        return model.sample(mel, z, **kw)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["student", "waveglow"])
def test_parallel_synthesis_on_the_device_equals_cpu(kind):
    model = _model(kind)
    mel, z = _inputs(batch=2, frames=40)
    expected = _from_noise(model, mel, z)
    on_device = copy.deepcopy(model).to(DEVICE)
    got = _from_noise(on_device, mel.to(DEVICE), z.to(DEVICE))
    assert got.device.type == DEVICE.type and got.dtype == torch.float32
    assert _relative_error(got, expected) < 1e-4


def test_student_forward_on_the_device_matches_its_baked_sampler():
    # the training forward (autograd path) and the inference path, both on the device
    model = _model("student").to(DEVICE)
    mel, z = (t.to(DEVICE) for t in _inputs(batch=2, frames=12))
    with torch.no_grad():
        x, mu_tot, log_sigma_tot = model(z, mel)
    torch.testing.assert_close(model.sample(mel, z), x, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mu_tot + log_sigma_tot.exp() * z, x, rtol=1e-4, atol=1e-5)


def test_waveglow_round_trip_on_the_device():
    model = _model("waveglow").to(DEVICE)
    mel, _ = _inputs(batch=2, frames=10)
    mel = mel.to(DEVICE)
    audio = 0.1 * torch.randn(2, 10 * FEATURES.hop_length, device=DEVICE)
    with torch.no_grad():
        z, log_det = model.encode(audio, mel)
        back = model.decode(z, mel)
    assert torch.isfinite(log_det).all()
    assert _relative_error(back, audio) < 1e-4


def test_teacher_sampling_on_the_device_follows_the_cpu():
    # Autoregressive: rounding differences feed back, so the match is loose but must hold
    # over a few hundred steps of a tiny model.
    model = _model("teacher")
    mel, z = _inputs(batch=2, frames=2)
    expected = _from_noise(model, mel, z)
    on_device = copy.deepcopy(model).to(DEVICE)
    got = _from_noise(on_device, mel.to(DEVICE), z.to(DEVICE))
    assert _relative_error(got, expected) < 1e-3


@needs_cuda
@pytest.mark.parametrize("batch,frames", [(1, 2), (2, 5)])  # 512, 1280 steps: chunks of 384
def test_teacher_cuda_graph_replays_the_eager_steps(batch, frames):
    import vocoder.models.teacher as teacher_module

    model = _model("teacher").to(DEVICE)
    mel, z = (t.to(DEVICE) for t in _inputs(batch=batch, frames=frames))
    eager = _from_noise(model, mel, z, cuda_graph=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: fail here
        graphed = _from_noise(model, mel, z, cuda_graph=True)
    chunks = teacher_module._GRAPHS[model][2]
    assert chunks.graph is not None
    # length not a whole number of chunks: the last chunk is partial
    assert z.shape[-1] % chunks.steps != 0
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    # replayed again, from a clean history: the same samples
    torch.testing.assert_close(_from_noise(model, mel, z, cuda_graph=True), graphed)


@needs_cuda
def test_teacher_cuda_graph_is_rebuilt_after_a_weight_update():
    import vocoder.models.teacher as teacher_module

    model = _model("teacher").to(DEVICE)
    mel, z = (t.to(DEVICE) for t in _inputs(batch=1, frames=2))
    before = _from_noise(model, mel, z, cuda_graph=True)
    first = teacher_module._GRAPHS[model][2]
    with torch.no_grad():
        model.wavenet.input.weight.mul_(1.5)
    after = _from_noise(model, mel, z, cuda_graph=True)
    assert teacher_module._GRAPHS[model][2] is not first
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, _from_noise(model, mel, z, cuda_graph=False),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["student", "waveglow"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "tf32"])
def test_low_precision_synthesis_stays_close_to_fp32(kind, dtype):
    if DEVICE.type != "cuda" and dtype != "bf16":
        pytest.skip("fp16 and tf32 synthesis are for CUDA")
    check = precision_check(_model(kind), dtype, DEVICE, FEATURES, seconds=0.5)
    # bf16 keeps 8 bits of mantissa, tf32 and fp16 11: on CPU in bf16 these models land 0.6%
    # (student) and 0.8% (WaveGlow) from fp32 in audio, 0.004 in log-mel L1
    bound = {"tf32": 0.01, "fp16": 0.01, "bf16": 0.05}[dtype]
    assert check["rel_audio_error_vs_fp32"] < bound, check
    assert check["log_mel_l1_vs_fp32"] < 0.05, check


@needs_cuda
def test_compiled_student_equals_eager():
    model = _model("student").to(DEVICE)
    mel, z = (t.to(DEVICE) for t in _inputs(batch=1, frames=20))
    compiled = torch.compile(model.sample)
    with torch.no_grad():
        for _ in range(2):  # the second call sees the lazily built caches
            got = compiled(mel, z)
    assert _relative_error(got, model.sample(mel, z)) < 1e-4


def test_distillation_loss_under_bf16_autocast_is_close_and_trains():
    from vocoder.distill import kl_divergence

    student = _model("student", inference=False).train().to(DEVICE)
    teacher = _model("teacher").to(DEVICE)
    teacher.requires_grad_(False)
    mel, z = (t.to(DEVICE) for t in _inputs(batch=2, frames=8))
    exact = kl_divergence(student, teacher, mel, z)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        mixed = kl_divergence(student, teacher, mel, z)
    assert mixed.dtype == torch.float32
    assert _relative_error(mixed.detach(), exact.detach()) < 0.01  # 0.09% on CPU
    mixed.mean().backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("kind", ["student", "waveglow"])
def test_vocoder_synth_on_the_device_writes_what_cpu_writes(kind, tmp_path):
    ckpt = tmp_path / f"{kind}.pt"
    save_checkpoint(make_checkpoint(_model(kind, inference=False), FEATURES.config.to_dict()), ckpt)
    t = np.arange(22050 // 2) / 22050
    sf.write(tmp_path / "tone.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 22050)
    written = {}
    for device in ("cpu", DEVICE.type):
        out = tmp_path / device
        proc = subprocess.run(
            [sys.executable, "-m", "vocoder.cli.synth", f"checkpoint={ckpt}",
             f"input={tmp_path / 'tone.wav'}", f"output={out}", f"device={device}", "sigma=0"],
            capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        written[device], _ = sf.read(out / "tone.wav")
    assert written["cpu"].shape == written[DEVICE.type].shape
    # the mel computed on the device too (cuFFT), then 16-bit rounding: a few LSBs apart
    difference = written["cpu"] - written[DEVICE.type]
    assert np.abs(difference).max() <= 16 / 32768
    assert np.sqrt(np.mean(difference**2)) <= 1e-2 * np.sqrt(np.mean(written["cpu"] ** 2))
    # load_model puts the model and its front end on the device
    model = load_model(ckpt, device=DEVICE)
    assert {p.device.type for p in model.parameters()} == {DEVICE.type}


@needs_cuda
def test_compiled_distillation_loss_and_gradients_equal_eager():
    # trainer.compile=true compiles this objective; random ops as in eager, so the same seed
    # draws the same student noise in both
    import torch._inductor.config as inductor_config

    from vocoder.distill import make_distill_objective

    teacher = _model("teacher").to(DEVICE).requires_grad_(False)
    student = _model("student", inference=False).train().to(DEVICE)
    objective = make_distill_objective(teacher, {"lambda_stft": 1.0}, FEATURES)(student)
    mel, _ = _inputs(batch=2, frames=8)
    mel, audio = mel.to(DEVICE), 0.1 * torch.randn(2, 8 * FEATURES.hop_length, device=DEVICE)
    results = []
    with inductor_config.patch(fallback_random=True):
        for run in (objective, torch.compile(objective)):
            student.zero_grad(set_to_none=True)
            torch.manual_seed(5)
            loss, _ = run(audio, mel)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
