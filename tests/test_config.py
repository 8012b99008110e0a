"""The config presets: per-kind trainer settings composed by Hydra (the command line wins),
presets that inherit instead of copying, and models that reach several pitch periods of the
lowest F0 of the data each preset is meant for (reach tested by gradient)."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

import vocoder
from vocoder.config import CONF_DIR
from vocoder.data.demo import _F0_RANGE_HZ

SAMPLE_RATE = 22050
# The lowest F0 of the data each preset is for: the demo corpus's (generated, exact) for the
# CPU presets; real speech down to a low male voice for base and paper.
LOWEST_F0_HZ = {"debug": _F0_RANGE_HZ[0], "ci": _F0_RANGE_HZ[0], "demo": _F0_RANGE_HZ[0],
                "base": 60.0, "paper": 60.0}
PERIODS = 3


def _compose(name: str, *overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(name, overrides=list(overrides))


def test_per_kind_trainer_settings_compose_and_the_command_line_wins():
    assert _compose("config", "experiment=demo").trainer.lr == 2e-3
    assert _compose("config", "experiment=demo", "model=waveglow").trainer.lr == 1e-3
    distill = _compose("distill", "experiment=demo", "teacher=x")
    assert (distill.trainer.lr, distill.trainer.batch_size) == (3e-3, 4)
    assert _compose("config", "experiment=paper", "model=waveglow").trainer.segment_frames == 64
    assert _compose("config", "experiment=paper", "model=waveglow",
                    "trainer.lr=5e-4").trainer.lr == 5e-4
    assert _compose("distill", "experiment=demo", "teacher=x",
                    "trainer.batch_size=2").trainer.batch_size == 2


def test_ci_preset_is_the_demo_preset_at_a_smaller_scale():
    demo, ci = _compose("config", "experiment=demo"), _compose("config", "experiment=ci")
    assert ci.arch == demo.arch and ci.distill == demo.distill
    assert ci.data.n_utterances < demo.data.n_utterances
    assert ci.trainer.batch_size < demo.trainer.batch_size


@pytest.mark.parametrize("experiment", sorted(LOWEST_F0_HZ))
def test_presets_reach_several_periods_of_the_lowest_pitch(experiment):
    period = SAMPLE_RATE / LOWEST_F0_HZ[experiment]
    student = vocoder.build_model("student", experiment=experiment)
    assert student.flow_reach >= PERIODS * period, (experiment, student.flow_reach)
    waveglow = vocoder.build_model("waveglow", experiment=experiment)
    assert waveglow.coupling_reach >= PERIODS * period, (experiment, waveglow.coupling_reach)


def test_student_flow_reach_by_gradient():
    # 16 skip channels: the head's ReLUs cannot all be off at the probed step
    model = vocoder.build_model("student", flow_layers=[3, 4], cycle_length=3,
                                residual_channels=4, gate_channels=4, skip_channels=16,
                                cond_channels=4).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    length, t = 400, 200
    for flow in model.flows:
        h = torch.randn(1, 1, length, dtype=torch.float64, requires_grad=True)
        cond = torch.randn(1, 4, length, dtype=torch.float64)
        flow(h, cond)[0, :, t].sum().backward()
        reached = (h.grad[0, 0] != 0).nonzero().flatten()
        # output t reads inputs t - receptive_field + 1 .. t (the flow shifts its input by one)
        assert t - reached.min() + 1 == flow.receptive_field
    assert model.flow_reach == min(flow.receptive_field for flow in model.flows) == 1 + 2 * 7
    assert max(flow.receptive_field for flow in model.flows) == 1 + 2 * 8


def test_waveglow_coupling_reach_by_gradient():
    model = vocoder.build_model("waveglow", n_flows=2, n_early_every=1, n_layers=3,
                                n_channels=8).double()
    coupling = model.couplings[0]
    with torch.no_grad():
        for p in coupling.parameters():
            p.add_(0.1 * torch.randn_like(p))
    steps, p = 64, 30
    x_a = torch.randn(1, coupling.n_half, steps, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(1, 80 * 8, steps, dtype=torch.float64)
    coupling.net(x_a, cond)[0, :, p].sum().backward()
    reached = (x_a.grad[0].abs().sum(0) != 0).nonzero().flatten()
    # squeezed steps p - R .. p + R, each of n_group samples
    assert (p - reached.min()) * model.n_group == model.coupling_reach
    assert (reached.max() - p) * model.n_group == model.coupling_reach
