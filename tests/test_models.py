"""The Vocoder contract every kind keeps: build_model of a preset's sizes carries its front
end, synthesize(mel, sigma, z) is deterministic given z and checks its shapes."""

from __future__ import annotations

import pytest
import torch

import vocoder
from vocoder.features import MelFrontEnd
from vocoder.models import KINDS

SMALL = {"teacher": dict(n_layers=3, residual_channels=4, gate_channels=4, skip_channels=4,
                         cond_channels=4),
         "student": dict(flow_layers=[2, 2], residual_channels=4, gate_channels=4,
                         skip_channels=4, cond_channels=4),
         "waveglow": dict(n_flows=2, n_early_every=1, n_layers=2, n_channels=8)}


@pytest.mark.parametrize("kind", KINDS)
def test_build_model_takes_the_preset_sizes_and_carries_its_front_end(kind):
    model = vocoder.build_model(kind, preset="hifigan", experiment="debug")
    assert isinstance(model.features, MelFrontEnd)
    assert model.features.config.name == "hifigan"
    assert (model.n_mels, model.hop_length) == (80, 256)
    from vocoder.config import experiment_arch

    for key, value in experiment_arch("debug", kind).items():
        assert model.arch_config()[key] == value
    overridden = vocoder.build_model(kind, **SMALL[kind])
    for key, value in SMALL[kind].items():
        assert overridden.arch_config()[key] == value
    # the front end is no part of the state dict: checkpoints keep their layout
    assert not any(name.startswith("features") for name in overridden.state_dict())


def test_build_model_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown model kind"):
        vocoder.build_model("hifigan")
    with pytest.raises(ValueError, match="unknown experiment 'huge'"):
        vocoder.build_model("teacher", experiment="huge")
    with pytest.raises(ValueError, match="unknown mel preset"):
        vocoder.build_model("teacher", preset="nope")


@pytest.mark.parametrize("kind", KINDS)
def test_synthesize_is_deterministic_given_z(kind):
    model = vocoder.build_model(kind, **SMALL[kind]).eval()
    with torch.no_grad():  # a fresh model is silent or an identity: give it some weights
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    mel = torch.randn(2, 80, 3) - 5.0
    z = torch.randn(2, 3 * 256)
    first = model.synthesize(mel, sigma=0.5, z=z)
    assert first.shape == (2, 3 * 256) and torch.isfinite(first).all()
    torch.testing.assert_close(model.synthesize(mel, sigma=0.5, z=z), first)
    assert not torch.allclose(model.synthesize(mel, sigma=0.5, z=-z), first)
    with pytest.raises(ValueError, match="z must be"):
        model.synthesize(mel, z=z[:, :-1])
    with pytest.raises(ValueError, match="mel must be"):
        model.synthesize(mel[:, :-1], z=z)
