"""WaveNet building blocks (training forms): causal convs, receptive field, causality,
weight norm, upsampler lengths and its polyphase form. The inference forms are tested against
these in test_baking.py."""

from __future__ import annotations

import math

import pytest
import torch

from vocoder.nn.wavenet import (
    CausalConv1d,
    MelUpsampler,
    WaveNetStack,
    default_upsample_scales,
)
from vocoder.nn.weight_norm import conv_weight

DTYPE = torch.float64


def tiny_stack(cond_channels: int = 3, **overrides) -> WaveNetStack:
    torch.manual_seed(0)
    kwargs = dict(in_channels=2, out_channels=3, n_layers=5, cycle_length=3,
                  residual_channels=4, gate_channels=6, skip_channels=5, kernel_size=3,
                  cond_channels=cond_channels)
    kwargs.update(overrides)
    return WaveNetStack(**kwargs).to(DTYPE)


def test_causal_conv_is_causal():
    torch.manual_seed(0)
    conv = CausalConv1d(2, 2, 3, dilation=4).to(DTYPE)
    x = torch.randn(1, 2, 30, dtype=DTYPE)
    y = x.clone()
    y[:, :, 10] += 1.0
    diff = (conv(y) - conv(x)).abs().sum(1)[0]
    assert diff[:10].max() == 0
    assert set(diff.nonzero().flatten().tolist()) == {10, 14, 18}
    assert conv.receptive_field == 9


def test_stack_receptive_field_by_gradient():
    stack = tiny_stack(cond_channels=0, n_layers=7, cycle_length=4)
    # dilations 1, 2, 4, 8, 1, 2, 4 with kernel 3
    assert stack.receptive_field == 1 + 2 * (1 + 2 + 4 + 8 + 1 + 2 + 4)
    length, t = 80, 70
    x = torch.randn(1, 2, length, dtype=DTYPE, requires_grad=True)
    stack(x)[:, :, t].sum().backward()
    reached = (x.grad.abs().sum(1)[0] > 0).nonzero().flatten()
    assert reached.min() == t - stack.receptive_field + 1
    assert reached.max() == t


def test_stack_causal_under_conditioning():
    stack = tiny_stack()
    x = torch.randn(2, 2, 50, dtype=DTYPE)
    cond = torch.randn(2, 3, 50, dtype=DTYPE)
    y = x.clone()
    y[:, :, 20] += 1.0
    diff = (stack(y, cond) - stack(x, cond)).abs()
    assert diff[:, :, :20].max() == 0
    assert diff[:, :, 20:].max() > 0


def test_zero_init_output_and_weight_norm_removal():
    stack = tiny_stack(zero_init_output=True, weight_norm=True)
    x = torch.randn(2, 2, 30, dtype=DTYPE)
    cond = torch.randn(2, 3, 30, dtype=DTYPE)
    assert stack(x, cond).abs().max() == 0
    with torch.no_grad():
        stack.head[-1].weight.normal_()
    before = stack(x, cond)
    stack.remove_weight_norm()
    stack.remove_weight_norm()  # idempotent
    assert not any("parametrizations" in name for name, _ in stack.named_parameters())
    torch.testing.assert_close(stack(x, cond), before)


@pytest.mark.parametrize("weight_norm", [False, True])
def test_input_init_gains_scale_the_first_layer_per_input_channel(weight_norm):
    plain = tiny_stack(weight_norm=weight_norm)  # (tiny_stack seeds the generator)
    scaled = tiny_stack(weight_norm=weight_norm, input_init_gains=[1.0, 0.25])
    torch.testing.assert_close(conv_weight(scaled.input)[:, :1], conv_weight(plain.input)[:, :1])
    torch.testing.assert_close(conv_weight(scaled.input)[:, 1:],
                               0.25 * conv_weight(plain.input)[:, 1:])
    with pytest.raises(ValueError, match="2 factors"):
        tiny_stack(input_init_gains=[1.0])


def test_stack_rejects_missing_conditioning():
    with pytest.raises(ValueError):
        tiny_stack()(torch.randn(1, 2, 10, dtype=DTYPE))
    with pytest.raises(ValueError):
        tiny_stack(0)(torch.randn(1, 2, 10, dtype=DTYPE), torch.randn(1, 3, 10, dtype=DTYPE))


@pytest.mark.parametrize("hop", [256, 200, 300, 275, 160, 7])
def test_default_upsample_scales_multiply_to_hop(hop):
    scales = default_upsample_scales(hop)
    assert math.prod(scales) == hop
    assert default_upsample_scales(256) == [4, 4, 4, 4]


@pytest.mark.parametrize("hop,scales", [(256, None), (256, [16, 16]), (200, None),
                                        (300, None), (12, [3, 4])])
def test_upsampler_output_length(hop, scales):
    torch.manual_seed(0)
    upsampler = MelUpsampler(6, hop, out_channels=4, upsample_scales=scales)
    mel = torch.randn(2, 6, 3)
    assert upsampler(mel).shape == (2, 4, 3 * hop)


def test_upsampler_rejects_bad_scales():
    with pytest.raises(ValueError):
        MelUpsampler(6, 256, upsample_scales=[4, 4, 4])


def test_upsampler_is_local():
    torch.manual_seed(0)
    upsampler = MelUpsampler(5, 16, frame_context=0, upsample_scales=[4, 4]).to(DTYPE)
    mel = torch.randn(1, 5, 6, dtype=DTYPE)
    changed = mel.clone()
    changed[:, :, 3] += 1.0
    diff = (upsampler(changed) - upsampler(mel)).abs().sum(1)[0]
    touched = diff.nonzero().flatten()
    # Frame 3 owns samples [48, 64); the smoothers spread it by at most 4 + 4 * 4 samples.
    assert diff[48:64].min() > 0
    assert touched.min() >= 48 - 20 and touched.max() < 64 + 20


def test_polyphase_weights_are_the_upsampler_on_the_identity():
    torch.manual_seed(0)
    hop, frames = 16, 17
    upsampler = MelUpsampler(5, hop, out_channels=3, upsample_scales=[4, 4]).to(DTYPE)
    with torch.no_grad():
        for smoother in upsampler.smoothers:  # not a box filter: every weight matters
            smoother.weight.add_(0.1 * torch.randn_like(smoother.weight))
    bands, reach = upsampler.polyphase(frames, "cpu", DTYPE)
    matrix = upsampler.stretch(torch.eye(frames, dtype=DTYPE))
    rebuilt = torch.zeros_like(matrix)
    for i in range(frames):
        for j in range(2 * reach + 1):
            if 0 <= i + j - reach < frames:
                rebuilt[i + j - reach, i * hop:(i + 1) * hop] = bands[i, :, j]
    torch.testing.assert_close(rebuilt, matrix, rtol=0, atol=1e-14)
    mel = torch.randn(2, 5, frames, dtype=DTYPE)
    torch.testing.assert_close(upsampler.project_frames(mel) @ matrix, upsampler(mel))


def test_weight_norm_is_one_mechanism_that_survives_copies_and_old_checkpoints():
    import copy

    from vocoder.nn.baking import bake_wavenet
    from vocoder.nn.weight_norm import WeightNormConv1d

    torch.manual_seed(0)
    stack = WaveNetStack(1, 2, n_layers=3, cycle_length=2, residual_channels=4,
                         gate_channels=6, skip_channels=4, cond_channels=3,
                         weight_norm=True).double()
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # input, cond, 2 per block, both head 1x1s (the last is not zero-initialised here)
    assert sum(isinstance(m, WeightNormConv1d) for m in stack.modules()) == 2 + 3 * 2 + 2
    x = torch.randn(2, 1, 20, dtype=torch.float64)
    cond = torch.randn(2, 3, 20, dtype=torch.float64)
    expected = stack(x, cond)
    # An EMA-style deep copy keeps working after the original drops its weight norm.
    ema = copy.deepcopy(stack)
    stack.remove_weight_norm()
    assert not any(isinstance(m, WeightNormConv1d) for m in stack.modules())
    torch.testing.assert_close(stack(x, cond), expected)
    torch.testing.assert_close(ema(x, cond), expected)
    assert bake_wavenet(ema).input_weight.shape == (1, 4)
    # A state dict in the layout of torch's parametrizations (checkpoints before session 8).
    old = {}
    for key, value in ema.state_dict().items():
        key = key.replace(".weight_g", ".parametrizations.weight.original0")
        old[key.replace(".weight_v", ".parametrizations.weight.original1")] = value
    fresh = WaveNetStack(1, 2, n_layers=3, cycle_length=2, residual_channels=4,
                         gate_channels=6, skip_channels=4, cond_channels=3,
                         weight_norm=True).double()
    fresh.load_state_dict(old)
    torch.testing.assert_close(fresh(x, cond), expected)
