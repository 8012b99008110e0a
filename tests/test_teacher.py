"""The MAF teacher: causality, cached sampling against the naive sampler, exact inversion,
likelihood, training."""

from __future__ import annotations

import math

import pytest
import torch

from vocoder.models import model_from_arch
from vocoder.models.teacher import Teacher

DTYPE = torch.float64


N_MELS, HOP = 6, 8
ARCH = dict(n_layers=5, cycle_length=3, residual_channels=6, gate_channels=8, skip_channels=6,
            kernel_size=3, cond_channels=4, upsample_scales=[2, 4])


def tiny_teacher(**overrides) -> Teacher:
    torch.manual_seed(0)
    return Teacher(N_MELS, HOP, **{**ARCH, **overrides}).to(DTYPE)


def random_inputs(batch: int = 2, frames: int = 6):
    torch.manual_seed(1)
    mel = torch.randn(batch, N_MELS, frames, dtype=DTYPE)
    x = 0.1 * torch.randn(batch, frames * HOP, dtype=DTYPE)
    return x, mel


@pytest.mark.parametrize("preemphasis", [0.0, 0.9])
def test_forward_shapes_and_causality(preemphasis):
    teacher = tiny_teacher(preemphasis=preemphasis)
    x, mel = random_inputs()
    mu, log_sigma = teacher(x, mel)
    assert mu.shape == log_sigma.shape == x.shape
    t0 = 17
    y = x.clone()
    y[:, t0] += 0.5
    mu_y, log_sigma_y = teacher(y, mel)
    # Position t sees x[:, :t] only: everything up to and including t0 is unchanged.
    assert (mu_y - mu)[:, :t0 + 1].abs().max() == 0
    assert (log_sigma_y - log_sigma)[:, :t0 + 1].abs().max() == 0
    assert (mu_y - mu)[:, t0 + 1:].abs().max() > 0
    assert (mu_y - mu)[:, t0 + teacher.receptive_field + 1:].abs().max() == 0


def test_rejects_mismatched_mel():
    teacher = tiny_teacher()
    x, mel = random_inputs()
    with pytest.raises(ValueError):
        teacher(x[:, :-1], mel)
    with pytest.raises(ValueError):
        teacher(x, mel[:, :-1])


@pytest.mark.parametrize("dtype,preemphasis", [(torch.float64, 0.0), (torch.float32, 0.0),
                                               (torch.float64, 0.9)])
def test_incremental_sample_matches_naive(dtype, preemphasis):
    teacher = tiny_teacher(preemphasis=preemphasis).to(dtype)
    _, mel = random_inputs(batch=3, frames=5)
    mel = mel.to(dtype)
    z = torch.randn(3, 5 * HOP, dtype=dtype)
    torch.testing.assert_close(teacher.sample(mel, z), teacher._sample_naive(mel, z))


@pytest.mark.parametrize("preemphasis", [0.0, 0.9])
def test_sample_then_score_recovers_z(preemphasis):
    teacher = tiny_teacher(preemphasis=preemphasis)
    _, mel = random_inputs()
    z = torch.randn(2, mel.shape[-1] * HOP, dtype=DTYPE)
    x = teacher.sample(mel, z)
    mu, log_sigma = teacher(x, mel)
    torch.testing.assert_close((x - mu) / torch.exp(log_sigma), z)
    # Deterministic given z; the temperature scales the noise.
    torch.testing.assert_close(teacher.sample(mel, z), x)
    torch.testing.assert_close(teacher.sample(mel, z, sigma=0.5), teacher.sample(mel, 0.5 * z))


def test_log_prob_is_gaussian_density():
    teacher = tiny_teacher()
    x, mel = random_inputs()
    mu, log_sigma = teacher(x, mel)
    expected = torch.distributions.Normal(mu, torch.exp(log_sigma)).log_prob(x).sum(-1)
    log_prob = teacher.log_prob(x, mel)
    assert log_prob.shape == (2,)
    torch.testing.assert_close(log_prob, expected)


def test_log_sigma_floor():
    teacher = tiny_teacher(log_sigma_min=0.5)
    x, mel = random_inputs()
    assert teacher(x, mel)[1].min() >= 0.5


def test_training_loss_finite_and_backprops():
    teacher = tiny_teacher()
    x, mel = random_inputs()
    loss, metrics = teacher.training_loss(x, mel)
    assert torch.isfinite(loss) and loss.dim() == 0
    assert set(metrics) == {"nll", "bits_per_sample", "log_sigma_mean"}
    assert metrics["bits_per_sample"] == pytest.approx(
        (metrics["nll"] + math.log(32768)) / math.log(2))
    loss.backward()
    grads = [p.grad for p in teacher.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_adam_lowers_nll_on_a_sinusoid():
    torch.manual_seed(0)
    teacher = Teacher(N_MELS, HOP, **{**ARCH, "residual_channels": 8, "gate_channels": 16,
                                      "skip_channels": 8})
    t = torch.arange(24 * HOP, dtype=torch.float32)
    audio = (0.5 * torch.sin(2 * math.pi * t / 20) + 0.02 * torch.randn_like(t))[None]
    mel = torch.zeros(1, N_MELS, 24)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=1e-2)
    first = None
    for _ in range(25):
        loss, metrics = teacher.training_loss(audio, mel)
        first = metrics["nll"] if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = -teacher.log_prob(audio, mel).item() / audio.shape[-1]
    assert final < first - 0.5


def test_weight_norm_and_prepare_for_inference():
    teacher = tiny_teacher(weight_norm=True)
    x, mel = random_inputs()
    z = torch.randn_like(x)
    mu, _ = teacher(x, mel)
    sampled = teacher.sample(mel, z)
    assert teacher.prepare_for_inference() is teacher
    assert not any("parametrizations" in name for name, _ in teacher.named_parameters())
    torch.testing.assert_close(teacher(x, mel)[0], mu)
    torch.testing.assert_close(teacher.sample(mel, z), sampled)


def test_registry_rebuild_and_synthesize():
    teacher = tiny_teacher()
    arch = teacher.arch_config()
    rebuilt = model_from_arch("teacher", N_MELS, HOP, arch).to(DTYPE)
    assert rebuilt.arch_config() == arch
    rebuilt.load_state_dict(teacher.state_dict())
    _, mel = random_inputs(batch=1, frames=3)
    audio = rebuilt.synthesize(mel.float())
    assert audio.shape == (1, 3 * HOP) and torch.isfinite(audio).all()
    z = torch.zeros(1, 3 * HOP, dtype=DTYPE)
    torch.testing.assert_close(rebuilt.sample(mel, z), teacher.sample(mel, z))


def test_chunked_sampling_replaying_whole_chunks_matches_naive(monkeypatch):
    # What a CUDA graph does, run eagerly: every chunk (the short last one too) replays all
    # `steps` steps of the recorded sequence on the same buffers and views. The chunk length is one
    # period of the tap buffers, so the partial last chunk and the phase of every later chunk
    # are exercised.
    from types import SimpleNamespace

    import vocoder.models.teacher as teacher_module

    monkeypatch.setattr(teacher_module, "_TERMS_BUDGET", 1)
    teacher = tiny_teacher(preemphasis=0.9)
    _, mel = random_inputs(batch=2, frames=5)
    z = torch.randn(2, 5 * HOP, dtype=DTYPE)
    chunks = teacher_module._SamplingChunks(teacher, 2)
    assert chunks.steps == chunks.stepper.period == 12
    assert z.shape[-1] % chunks.steps != 0

    def replay():
        # A graph replays the views recorded at capture, which began at phase 0.
        for taps in chunks.stepper.taps:
            taps._t = 0
        chunks._steps(chunks.steps)

    chunks.graph = SimpleNamespace(replay=replay)
    monkeypatch.setattr(Teacher, "_sampling_chunks", lambda self, batch, cuda_graph: chunks)
    expected = teacher._sample_naive(mel, z)
    torch.testing.assert_close(teacher.sample(mel, z), expected)
    # The same chunks again from time 0: start() clears the history.
    torch.testing.assert_close(teacher.sample(mel, z), expected)


def test_cuda_graph_needs_cuda():
    teacher = tiny_teacher()
    _, mel = random_inputs(batch=1, frames=2)
    with pytest.raises(ValueError, match="CUDA"):
        teacher.sample(mel, cuda_graph=True)


def test_failed_graph_capture_falls_back_to_eager_sampling(monkeypatch):
    import vocoder.models.teacher as teacher_module

    def fail(self):
        raise RuntimeError("capture not supported here")

    monkeypatch.setattr(teacher_module._SamplingChunks, "_capture", fail)
    teacher = tiny_teacher()
    with pytest.warns(RuntimeWarning, match="capture failed"):
        chunks = teacher._sampling_chunks(2, cuda_graph=True)
    assert chunks.graph is None
    # kept for the next call with the same weights: no second warning, the same object
    assert teacher._sampling_chunks(2, cuda_graph=True) is chunks
    _, mel = random_inputs(batch=2, frames=3)
    z = torch.randn(2, 3 * HOP, dtype=DTYPE)
    monkeypatch.setattr(Teacher, "_sampling_chunks", lambda self, batch, cuda_graph: chunks)
    torch.testing.assert_close(teacher.sample(mel, z), teacher._sample_naive(mel, z))



@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_beta_nll_weights_each_sample_by_sigma_to_the_2_beta(beta):
    from vocoder.losses import QUANTISATION_STEP, gaussian_log_prob

    teacher = tiny_teacher(nll_beta=beta)
    x, mel = random_inputs()
    torch.manual_seed(5)
    loss, metrics = teacher.training_loss(x, mel)
    torch.manual_seed(5)  # the same dequantisation noise
    noisy = x + (torch.rand_like(x) - 0.5) * QUANTISATION_STEP
    mu, log_sigma = teacher(noisy, mel)
    mu = mu.detach().requires_grad_()
    log_p = gaussian_log_prob(noisy, mu, log_sigma.detach())
    torch.testing.assert_close(metrics["nll"], float(-log_p.detach().mean()))
    weight = torch.exp(2 * beta * log_sigma.detach())
    torch.testing.assert_close(loss, -(log_p * weight).sum() / weight.sum())
    # the mean's gradient is (mu - x) / sigma^(2 - 2 beta), up to the normalisation
    grad, = torch.autograd.grad(-(log_p * weight).sum(), mu)
    expected = (mu - noisy) * torch.exp(-2 * (1 - beta) * log_sigma.detach())
    torch.testing.assert_close(grad, expected.detach())
    with pytest.raises(ValueError, match="nll_beta"):
        tiny_teacher(nll_beta=1.5)


def test_preemphasis_is_a_unit_jacobian_layer_in_front_of_the_network():
    # The MAF of x with pre-emphasis is the plain MAF of e = x - a x_(t-1) with its mean
    # shifted by a x_(t-1): same network, same sigma, log-density unchanged (log-det 0).
    plain, emphasised = tiny_teacher(), tiny_teacher(preemphasis=0.9)
    x, mel = random_inputs()
    e = x - 0.9 * torch.nn.functional.pad(x, (1, -1))
    mu_e, log_sigma_e = plain(e, mel)
    mu_x, log_sigma_x = emphasised(x, mel)
    torch.testing.assert_close(log_sigma_x, log_sigma_e)
    torch.testing.assert_close(mu_x - 0.9 * torch.nn.functional.pad(x, (1, -1)), mu_e)
    torch.testing.assert_close(emphasised.log_prob(x, mel), plain.log_prob(e, mel))
    assert emphasised.receptive_field == plain.receptive_field + 1


def test_input_noise_corrupts_the_past_only_in_training():
    # The network reads x + n as its past; the likelihood stays that of (dequantised) x.
    from vocoder.losses import QUANTISATION_STEP, gaussian_log_prob

    teacher = tiny_teacher(input_noise=0.01)
    x, mel = random_inputs()
    torch.manual_seed(5)
    loss, metrics = teacher.training_loss(x, mel)
    torch.manual_seed(5)  # the same dequantisation noise, then the same input noise
    target = x + (torch.rand_like(x) - 0.5) * QUANTISATION_STEP
    past = target + 0.01 * torch.randn_like(x)
    mu, log_sigma = teacher(past, mel)
    torch.testing.assert_close(loss, -gaussian_log_prob(target, mu, log_sigma).mean())
    clean_mu, _ = teacher(target, mel)
    assert not torch.allclose(mu, clean_mu)
    # validation (eval mode) reads the clean past, like an identical model without the noise
    plain = tiny_teacher()
    teacher.eval(), plain.eval()
    torch.manual_seed(5)
    eval_loss, _ = teacher.training_loss(x, mel)
    torch.manual_seed(5)
    plain_loss, _ = plain.training_loss(x, mel)
    torch.testing.assert_close(eval_loss, plain_loss)
    assert teacher.arch_config()["input_noise"] == 0.01
    assert "input_noise" not in plain.arch_config()  # old checkpoints' configs are unchanged
    rebuilt = model_from_arch("teacher", N_MELS, HOP, teacher.arch_config())
    assert rebuilt.input_noise == 0.01
    with pytest.raises(ValueError, match="input_noise"):
        tiny_teacher(input_noise=-1.0)


def test_input_noise_stops_at_its_share_of_training():
    # Before the cut-off the past is noisy; from it on, training reads the clean past exactly as
    # a teacher without noise does.
    teacher = tiny_teacher(input_noise=0.01, input_noise_until=0.5)
    plain = tiny_teacher()
    x, mel = random_inputs()

    def loss(model):
        torch.manual_seed(5)
        return model.training_loss(x, mel)[0]

    teacher.set_training_progress(4, 10)
    assert not torch.allclose(loss(teacher), loss(plain))
    teacher.set_training_progress(5, 10)
    torch.testing.assert_close(loss(teacher), loss(plain))
    assert teacher.arch_config()["input_noise_until"] == 0.5
    assert "input_noise_until" not in tiny_teacher(input_noise=0.01).arch_config()
    rebuilt = model_from_arch("teacher", N_MELS, HOP, teacher.arch_config())
    assert rebuilt.input_noise_until == 0.5
    with pytest.raises(ValueError, match="input_noise_until"):
        tiny_teacher(input_noise_until=1.5)
