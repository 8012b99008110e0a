"""WaveNet building blocks: causal convs, incremental steps against the parallel forward,
receptive field, upsampler lengths."""

from __future__ import annotations

import math

import pytest
import torch

from vocoder.nn.wavenet import (
    CausalConv1d,
    MelUpsampler,
    ResidualBlock,
    WaveNetStack,
    default_upsample_scales,
)

DTYPE = torch.float64


def tiny_stack(cond_channels: int = 3, **overrides) -> WaveNetStack:
    torch.manual_seed(0)
    kwargs = dict(in_channels=2, out_channels=3, n_layers=5, cycle_length=3,
                  residual_channels=4, gate_channels=6, skip_channels=5, kernel_size=3,
                  cond_channels=cond_channels)
    kwargs.update(overrides)
    return WaveNetStack(**kwargs).to(DTYPE)


@pytest.mark.parametrize("kernel_size,dilation", [(1, 1), (2, 1), (2, 4), (3, 2), (3, 8)])
def test_causal_conv_step_matches_forward(kernel_size, dilation):
    torch.manual_seed(0)
    conv = CausalConv1d(3, 5, kernel_size, dilation).to(DTYPE)
    x = torch.randn(2, 3, 40, dtype=DTYPE)
    conv.reset_state(batch=2)
    stepped = torch.cat([conv.step(x[:, :, t:t + 1]) for t in range(x.shape[-1])], dim=-1)
    torch.testing.assert_close(stepped, conv(x))
    # A reset starts again from an empty history.
    conv.reset_state(batch=2)
    torch.testing.assert_close(conv.step(x[:, :, :1]), conv(x[:, :, :1]))


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


@pytest.mark.parametrize("has_residual", [True, False])
def test_residual_block_step_matches_forward(has_residual):
    torch.manual_seed(0)
    block = ResidualBlock(4, 6, 5, kernel_size=2, dilation=2, has_residual=has_residual)
    block = block.to(DTYPE)
    h = torch.randn(2, 4, 25, dtype=DTYPE)
    cond = torch.randn(2, 6, 25, dtype=DTYPE)
    h_next, skip = block(h, cond)
    block.reset_state(batch=2)
    steps = [block.step(h[:, :, t:t + 1], cond[:, :, t:t + 1]) for t in range(25)]
    torch.testing.assert_close(torch.cat([s for _, s in steps], -1), skip)
    if has_residual:
        torch.testing.assert_close(torch.cat([r for r, _ in steps], -1), h_next)
    else:
        assert h_next is None and all(r is None for r, _ in steps)


@pytest.mark.parametrize("cond_channels", [0, 3])
@pytest.mark.parametrize("kernel_size", [2, 3])
def test_stack_step_matches_forward(cond_channels, kernel_size):
    stack = tiny_stack(cond_channels, kernel_size=kernel_size)
    x = torch.randn(3, 2, 60, dtype=DTYPE)
    cond = torch.randn(3, cond_channels, 60, dtype=DTYPE) if cond_channels else None
    expected = stack(x, cond)
    stack.reset_state(batch=3)
    stepped = [stack.step(x[:, :, t:t + 1], None if cond is None else cond[:, :, t:t + 1])
               for t in range(60)]
    torch.testing.assert_close(torch.cat(stepped, -1), expected)


def test_stepper_with_precomputed_terms_matches_forward():
    stack = tiny_stack()
    x = torch.randn(2, 2, 40, dtype=DTYPE)
    cond = torch.randn(2, 3, 40, dtype=DTYPE)
    stepper = stack.reset_state(batch=2)
    terms = stepper.conditioning_terms(cond)
    assert terms.shape == (40, stack.n_layers, 2, stack.gate_channels)
    stepped = torch.stack([stepper.step(x[:, :, t], terms[t]).clone() for t in range(40)], -1)
    torch.testing.assert_close(stepped, stack(x, cond))


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
