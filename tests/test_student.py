import json
import math

import pytest
import torch

from vocoder.models import model_from_arch
from vocoder.models.student import Student
from vocoder.nn import parallel as parallel_module

N_MELS, HOP = 6, 16


def _student(dtype=torch.float64, **arch) -> Student:
    """A tiny student with every weight random, the zero-initialised last layers included (an
    identity flow would pass the triangularity tests trivially)."""
    arch = {"flow_layers": [3, 2], "cycle_length": 2, "residual_channels": 6,
            "gate_channels": 8, "skip_channels": 5, "cond_channels": 4, **arch}
    model = Student(N_MELS, HOP, **arch).to(dtype)
    with torch.no_grad():
        for flow in model.flows:
            flow.head[-1].weight.normal_(0.0, 1.0)
            flow.head[-1].bias.normal_(0.0, 0.3)
        for smoother in model.upsampler.smoothers:
            smoother.weight.uniform_(0.0, 0.5)
    return model


def _inputs(batch=2, frames=4, dtype=torch.float64):
    return (torch.randn(batch, frames * HOP, dtype=dtype),
            torch.randn(batch, N_MELS, frames, dtype=dtype))


def test_output_is_affine_in_z_with_the_returned_totals():
    model = _student()
    z, mel = _inputs()
    x, mu_tot, log_sigma_tot = model(z, mel)
    assert x.shape == mu_tot.shape == log_sigma_tot.shape == z.shape
    torch.testing.assert_close(x, mu_tot + torch.exp(log_sigma_tot) * z, rtol=0, atol=1e-12)
    assert log_sigma_tot.std() > 0.05 and mu_tot.std() > 0.05 * model.audio_scale


def test_flows_work_in_units_of_audio_scale():
    """audio_scale only rescales what the flows produce: x, mu_tot scale with it and
    log_sigma_tot shifts by its log; the fast sampling path agrees."""
    torch.manual_seed(0)
    unit = _student(audio_scale=1.0)
    scaled = _student(audio_scale=0.05)
    scaled.load_state_dict(unit.state_dict())
    z, mel = _inputs()
    x1, mu1, ls1 = unit(z, mel)
    x2, mu2, ls2 = scaled(z, mel)
    torch.testing.assert_close(x2, 0.05 * x1)
    torch.testing.assert_close(mu2, 0.05 * mu1)
    torch.testing.assert_close(ls2, ls1 + math.log(0.05))
    torch.testing.assert_close(scaled.sample(mel, z), x2.detach())


def test_jacobian_is_lower_triangular_with_diagonal_sigma_tot():
    model = _student()
    z, mel = _inputs(batch=1)
    jac = torch.autograd.functional.jacobian(lambda v: model(v, mel)[0], z)[0, :, 0]
    _, _, log_sigma_tot = model(z, mel)
    assert torch.count_nonzero(torch.triu(jac, diagonal=1)) == 0
    torch.testing.assert_close(torch.diagonal(jac), torch.exp(log_sigma_tot[0]))
    # Far from trivially diagonal: x_t reads many earlier z.
    assert (torch.tril(jac, diagonal=-1).abs() > 1e-6).sum() > 500


def test_totals_depend_only_on_earlier_noise():
    model = _student()
    z, mel = _inputs(batch=1)
    for index in (1, 2):
        jac = torch.autograd.functional.jacobian(
            lambda v, index=index: model(v, mel)[index], z)[0, :, 0]
        assert torch.count_nonzero(torch.triu(jac)) == 0
        assert jac.abs().sum() > 0


def test_receptive_field_is_the_reach_of_the_totals():
    model = _student()
    z, mel = _inputs(batch=1, frames=6)
    jac = torch.autograd.functional.jacobian(lambda v: model(v, mel)[1], z)[0, :, 0]
    reach = max(t - s for t, s in torch.nonzero(jac.abs() > 0).tolist())
    assert reach == model.receptive_field == sum(f.receptive_field for f in model.flows)


def test_log_prob_of_sample_is_the_change_of_variables_density():
    model = _student()
    z, mel = _inputs(batch=1)
    x, log_q = model.log_prob_of_sample(z, mel)
    jac = torch.autograd.functional.jacobian(lambda v: model(v, mel)[0], z)[0, :, 0]
    log_det = torch.linalg.slogdet(jac).logabsdet
    base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum()
    torch.testing.assert_close(log_q[0], base - log_det)
    torch.testing.assert_close(x, model(z, mel)[0])


@pytest.mark.parametrize("batch,frames,scales", [(1, 1, None), (1, 5, None), (1, 13, None),
                                                 (3, 4, [4, 4]), (2, 11, [2, 8])])
@pytest.mark.parametrize("block_rows", [None, HOP, 3 * HOP])
def test_baked_sampling_equals_the_module_forward(batch, frames, scales, block_rows,
                                                 monkeypatch):
    # One block for all rows (as on a GPU), blocks of one hop, and blocks of three hops with
    # a shorter last one (the layers run block by block on CPU).
    monkeypatch.setattr(parallel_module, "CPU_BLOCK_ROWS", block_rows)
    model = _student(upsample_scales=scales).eval()
    z, mel = _inputs(batch, frames)
    x = model.sample(mel, z=z)
    torch.testing.assert_close(x, model(z, mel)[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(model.sample(mel, z=z, sigma=0.5), model(0.5 * z, mel)[0],
                               rtol=0, atol=1e-12)


def test_baked_weights_follow_weight_updates():
    model = _student().eval()
    z, mel = _inputs()
    before = model.sample(mel, z=z)
    with torch.no_grad():
        model.flows[0].head[-1].bias.add_(0.5)
    after = model.sample(mel, z=z)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, model(z, mel)[0])


def test_synthesize_shape_and_float32():
    model = _student(dtype=torch.float32).eval()
    mel = torch.randn(3, N_MELS, 7)
    audio = model.synthesize(mel)
    assert audio.shape == (3, 7 * HOP) and audio.dtype == torch.float32
    assert torch.isfinite(audio).all()
    z, _ = _inputs(3, 7, torch.float32)
    torch.testing.assert_close(model.sample(mel, z=z), model(z, mel)[0], rtol=1e-4, atol=1e-5)


def test_prepare_for_inference_keeps_outputs():
    model = _student(weight_norm=True).eval()
    z, mel = _inputs()
    expected = model(z, mel)[0].detach()
    model.prepare_for_inference()
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(model(z, mel)[0], expected)
    torch.testing.assert_close(model.sample(mel, z=z), expected)


def test_fresh_student_starts_at_the_identity_or_a_plain_scale():
    z, mel = _inputs(dtype=torch.float32)
    fresh = Student(N_MELS, HOP, flow_layers=[2, 2], residual_channels=4, gate_channels=4,
                    skip_channels=4, cond_channels=4)
    torch.testing.assert_close(fresh(z, mel)[0], z * fresh.audio_scale)
    scaled = Student(N_MELS, HOP, flow_layers=[2, 2], residual_channels=4, gate_channels=4,
                     skip_channels=4, cond_channels=4, log_sigma_init=-3.0, audio_scale=1.0)
    x, mu_tot, log_sigma_tot = scaled(z, mel)
    torch.testing.assert_close(x, z * math.exp(-3.0))
    assert mu_tot.abs().max() == 0 and torch.allclose(log_sigma_tot, torch.tensor(-3.0))


def test_arch_config_is_json_and_rebuilds_the_model():
    model = _student(dtype=torch.float32)
    arch = model.arch_config()
    assert json.loads(json.dumps(arch)) == arch
    rebuilt = model_from_arch("student", N_MELS, HOP, arch)
    rebuilt.load_state_dict(model.state_dict())
    z, mel = _inputs(dtype=torch.float32)
    torch.testing.assert_close(rebuilt(z, mel)[0], model(z, mel)[0])


def test_mismatched_mel_is_refused():
    model = _student()
    z, mel = _inputs()
    with pytest.raises(ValueError, match="mel frames"):
        model(z[:, :-1], mel)
    with pytest.raises(ValueError, match="mel must be"):
        model.sample(mel[:, :-1])
