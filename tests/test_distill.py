import math
import os
import subprocess
import sys

import pytest
import torch

from vocoder.distill import (
    DistillationObjective,
    distillation_pass,
    gaussian_kl,
    kl_divergence,
    kl_per_step,
    make_distill_objective,
)
from vocoder.models.student import Student
from vocoder.models.teacher import Teacher

N_MELS, HOP = 6, 16


def _pair(dtype=torch.float32, teacher_log_sigma=-1.0):
    """A tiny random teacher (log sigma about ``teacher_log_sigma``) and a tiny student whose
    flows are not the identity."""
    teacher = Teacher(N_MELS, HOP, n_layers=3, cycle_length=2, residual_channels=6,
                      gate_channels=8, skip_channels=6, kernel_size=2, cond_channels=4)
    student = Student(N_MELS, HOP, flow_layers=[2, 2], cycle_length=2, residual_channels=6,
                      gate_channels=8, skip_channels=6, cond_channels=4)
    with torch.no_grad():
        teacher.wavenet.head[-1].bias[1] += teacher_log_sigma
        for flow in student.flows:
            flow.head[-1].weight.normal_(0.0, 0.5)
    return student.to(dtype), teacher.to(dtype)


def test_gaussian_kl_matches_torch_distributions():
    shape = (3, 50)
    mu_s, mu_t = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    log_s, log_t = (3 * torch.randn(shape, dtype=torch.float64) for _ in range(2))
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mu_s, log_s.exp()),
                                                 torch.distributions.Normal(mu_t, log_t.exp()))
    torch.testing.assert_close(gaussian_kl(mu_s, log_s, mu_t, log_t), expected)
    # Nearly equal Gaussians: KL ~ r^2 (r = log-scale gap), still accurate in float32.
    r = torch.tensor([1e-3, -1e-4], dtype=torch.float32)
    close = gaussian_kl(torch.zeros(2), r, torch.zeros(2), torch.zeros(2))
    torch.testing.assert_close(close, r.double().square().float(), rtol=1e-3, atol=0)


def test_closed_form_and_monte_carlo_estimate_the_same_kl():
    student, teacher = _pair(torch.float64)
    batch = 1024
    mel = torch.randn(1, N_MELS, 2, dtype=torch.float64).expand(batch, -1, -1)
    z = torch.randn(batch, 2 * HOP, dtype=torch.float64)
    with torch.no_grad():
        closed = kl_divergence(student, teacher, mel, z)
        monte_carlo = kl_divergence(student, teacher, mel, z, estimator="monte_carlo")
        independent = kl_divergence(student, teacher, mel, estimator="monte_carlo")
    error = monte_carlo.std() / math.sqrt(batch)
    assert closed.mean() > 1.0 and closed.std() < monte_carlo.std()
    # Paired: given the past, each MC term has the closed-form term as its mean.
    difference = monte_carlo - closed
    assert abs(difference.mean()) < 4 * difference.std() / math.sqrt(batch)
    assert abs(independent.mean() - closed.mean()) < 4 * error


def test_skip_leaves_out_exactly_the_first_steps():
    student, teacher = _pair(torch.float64)
    mel = torch.randn(3, N_MELS, 3, dtype=torch.float64)
    z = torch.randn(3, 3 * HOP, dtype=torch.float64)
    with torch.no_grad():
        run = distillation_pass(student, teacher, mel, z)
        for estimator in ("closed_form", "monte_carlo"):
            steps = kl_per_step(run, student, teacher, estimator)
            full = kl_divergence(student, teacher, mel, z, estimator)
            skipped = kl_divergence(student, teacher, mel, z, estimator, skip=7)
            torch.testing.assert_close(full, steps.sum(-1))
            torch.testing.assert_close(full - skipped, steps[:, :7].sum(-1))
    with pytest.raises(ValueError, match="skip"):
        kl_divergence(student, teacher, mel, z, skip=3 * HOP)
    with pytest.raises(ValueError, match="estimator"):
        kl_divergence(student, teacher, mel, z, estimator="exact")


def test_log_sigma_floors_apply_to_the_closed_form():
    student, teacher = _pair(torch.float64)
    student.log_sigma_min = teacher.log_sigma_min = 0.5
    mel = torch.randn(2, N_MELS, 2, dtype=torch.float64)
    z = torch.randn(2, 2 * HOP, dtype=torch.float64)
    with torch.no_grad():
        run = distillation_pass(student, teacher, mel, z)
        expected = gaussian_kl(run.mu_student, run.log_sigma_student.clamp(min=0.5),
                               run.mu_teacher, run.log_sigma_teacher.clamp(min=0.5))
        torch.testing.assert_close(kl_per_step(run, student, teacher), expected)


def test_a_step_trains_the_student_and_leaves_the_teacher_alone():
    student, teacher = _pair()
    objective = DistillationObjective(student, teacher, lambda_stft=1.0, skip=5,
                                      stft_resolutions=[[64, 16, 64], [128, 32, 128]])
    objective.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    mel = torch.randn(2, N_MELS, 16)
    audio = 0.1 * torch.randn(2, 16 * HOP)
    loss, metrics = objective(audio, mel)
    assert set(metrics) == {"kl", "kl_total", "logsigma_reg", "stft", "student_log_sigma_mean",
                            "teacher_log_sigma_mean"}
    assert math.isclose(metrics["kl"] * (16 * HOP - 5), metrics["kl_total"], rel_tol=1e-5)
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key])
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, student_before[k])]
    assert len(changed) > len(student_before) // 2
    objective.eval().train()
    assert not teacher.training and student.training


def test_mel_term_is_the_log_mel_l1_to_the_real_audio():
    from vocoder.features import MelConfig, MelFrontEnd

    features = MelFrontEnd(MelConfig(name="tiny", sample_rate=4000, n_fft=64, hop_length=HOP,
                                     win_length=64, n_mels=N_MELS, fmax=2000.0))
    student, teacher = _pair()
    mel = torch.randn(2, N_MELS, 8)
    audio = 0.1 * torch.randn(2, 8 * HOP)
    plain = DistillationObjective(student, teacher, lambda_stft=0.0)
    with_mel = DistillationObjective(student, teacher, lambda_stft=0.0, lambda_mel=2.0,
                                     features=features)
    torch.manual_seed(3)
    loss_plain, _ = plain(audio, mel)
    torch.manual_seed(3)
    loss, metrics = with_mel(audio, mel)
    torch.manual_seed(3)
    x = distillation_pass(student, teacher, mel, torch.randn_like(audio)).x
    expected = (features(x) - features(audio)).abs().mean().detach()
    assert metrics["mel"] == pytest.approx(float(expected), rel=1e-5) and metrics["mel"] > 0
    torch.testing.assert_close(loss, loss_plain + 2.0 * expected)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    with pytest.raises(ValueError, match="front end"):
        DistillationObjective(student, teacher, lambda_mel=1.0)
    made = make_distill_objective(teacher, {"lambda_mel": 0.5}, features)(student)
    assert made.lambda_mel == 0.5 and made.features is not features
    # its own copy: moving the objective leaves the caller's front end where it was
    made.to(torch.float64)
    assert features.mel_basis.dtype == torch.float32


def test_the_kl_reaches_the_student_through_the_teacher():
    # With the student's own totals held fixed, the KL still moves with x through the teacher.
    student, teacher = _pair()
    mel = torch.randn(1, N_MELS, 2)
    x = torch.randn(1, 2 * HOP, requires_grad=True)
    mu_t, log_sigma_t = teacher(x, mel)
    kl = gaussian_kl(torch.zeros_like(x), torch.zeros_like(x), mu_t, log_sigma_t).sum()
    (grad,) = torch.autograd.grad(kl, x)
    assert grad.abs().sum() > 0


def test_short_distillation_lowers_the_kl():
    torch.manual_seed(1)
    student, teacher = _pair(teacher_log_sigma=-2.0)
    skip = teacher.receptive_field
    objective = DistillationObjective(student, teacher, lambda_stft=0.0, skip=skip)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    mel = torch.randn(1, N_MELS, 4)
    eval_z = torch.randn(64, 4 * HOP)

    def kl_now() -> float:
        with torch.no_grad():
            return float(kl_divergence(student, teacher, mel.expand(64, -1, -1), eval_z,
                                       skip=skip).mean())

    before = kl_now()
    for _ in range(40):
        loss, _ = objective(torch.zeros(16, 4 * HOP), mel.expand(16, -1, -1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = kl_now()
    assert after < 0.1 * before, (before, after)


def test_make_distill_objective_reads_the_config_block():
    student, teacher = _pair()
    make = make_distill_objective(teacher, {"lambda_logsigma": 2.0, "lambda_stft": 0.0,
                                            "estimator": "monte_carlo",
                                            "skip_receptive_field": True})
    objective = make(student)
    assert objective.skip == teacher.receptive_field
    assert objective.estimator == "monte_carlo" and objective.lambda_logsigma == 2.0
    assert objective.stft is None and objective.student is student
    plain = make_distill_objective(teacher, {"skip_receptive_field": False, "skip": 3})(student)
    assert plain.skip == 3 and plain.stft is not None


@pytest.mark.parametrize("excitation", [False, True])
def test_distill_cli_writes_a_student_checkpoint(tmp_path, excitation):
    from vocoder.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
    from vocoder.features import MelFrontEnd
    from vocoder.models import load_model

    features = MelFrontEnd.from_preset("tacotron2")
    teacher = Teacher(features.n_mels, features.hop_length, n_layers=2, cycle_length=2,
                      residual_channels=4, gate_channels=4, skip_channels=4, kernel_size=2,
                      cond_channels=4,
                      excitation={"sample_rate": features.sample_rate} if excitation else None)
    if excitation:  # a predictor that is not at its initial values
        torch.nn.init.normal_(teacher.excitation.predictor.out.weight)
    teacher_path = tmp_path / "teacher.pt"
    save_checkpoint(make_checkpoint(teacher, features.config.to_dict()), teacher_path)
    run_dir = tmp_path / "run"
    arch = {"flow_layers": "[2,2]", "cycle_length": 2, "residual_channels": 4,
            "gate_channels": 4, "skip_channels": 4, "cond_channels": 4}
    command = [
        sys.executable, "-m", "vocoder.cli.distill", f"teacher={teacher_path}", "data=demo",
        "data.n_utterances=12", "trainer.max_steps=3", "trainer.batch_size=2",
        "trainer.segment_frames=8", "trainer.val_every=3", "trainer.num_workers=0",
        "trainer.device=cpu", "trainer.progress=false", "trainer.tensorboard=false",
        f"run_dir={run_dir}",
    ] + [f"++arch.student.{key}={value}" for key, value in arch.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt", kind="student")
    assert ckpt["step"] == 3
    assert ckpt["extra"]["teacher_checkpoint"] == str(teacher_path.resolve())
    assert ckpt["arch"]["flow_layers"] == [2, 2]
    assert ckpt["features"] == features.config.to_dict()
    assert {"kl", "stft"} <= set(ckpt["metrics"])
    model = load_model(run_dir / "checkpoints" / "last.pt")
    assert model.synthesize(torch.randn(1, features.n_mels, 3)).shape == (1, 3 * 256)
    # The student has an excitation exactly when its teacher has, with the teacher's predictor.
    assert ckpt["arch"]["excitation"] == (teacher.excitation.config() if excitation else None)
    if excitation:
        for name, value in teacher.excitation.state_dict().items():
            torch.testing.assert_close(ckpt["model"][f"excitation.{name}"], value, rtol=0, atol=0)


def test_float32_models_take_float64_inputs():
    """Audio read by soundfile is float64: every entry point of the public surface casts it
    to the model's dtype and gives the float32 result."""
    student, teacher = _pair(torch.float32)
    mel = torch.randn(2, N_MELS, 3, dtype=torch.float64)
    z = torch.randn(2, 3 * HOP, dtype=torch.float64)
    torch.testing.assert_close(teacher.log_prob(z, mel), teacher.log_prob(z.float(), mel.float()),
                               rtol=0, atol=0, check_dtype=False)
    for got, want in zip(student(z, mel), student(z.float(), mel.float()), strict=True):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    torch.testing.assert_close(kl_divergence(student, teacher, mel, z),
                               kl_divergence(student, teacher, mel.float(), z.float()),
                               rtol=0, atol=0, check_dtype=False)


def test_lambda_kl_weighs_only_the_kl_term():
    student, teacher = _pair()
    mel = torch.randn(2, N_MELS, 8)
    audio = 0.1 * torch.randn(2, 8 * HOP)
    losses = {}
    for weight in (0.0, 1.0, 3.0):
        objective = DistillationObjective(student, teacher, lambda_stft=0.5, lambda_kl=weight,
                                          stft_resolutions=[[16, 4, 16]])
        torch.manual_seed(5)
        losses[weight], metrics = objective(audio, mel)
    assert metrics["kl"] > 0
    # Linear in the weight, with the KL as slope: the other terms do not move.
    torch.testing.assert_close(losses[3.0] - losses[1.0], 2 * (losses[1.0] - losses[0.0]))
    torch.testing.assert_close(losses[1.0] - losses[0.0], torch.tensor(metrics["kl"]))
    with pytest.raises(ValueError, match="lambda_kl"):
        DistillationObjective(student, teacher, lambda_kl=-1.0)
    assert make_distill_objective(teacher, {"lambda_kl": 0.25})(student).lambda_kl == 0.25
