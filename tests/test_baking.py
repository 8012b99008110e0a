"""The one baking step and the inference engines built on it: each equals the training form.

The rewrites (one-sigmoid gate, biases as rows, first layer folded through the input) are
checked on their own, then the incremental and parallel engines against the module forward
of the same stack, with an input scale and an output affine baked in.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vocoder.nn import parallel as parallel_module
from vocoder.nn.baking import bake_wavenet, bias_rows, double_filter_half, fold_input_affine, gate_
from vocoder.nn.incremental import IncrementalStack
from vocoder.nn.parallel import ParallelStack, ParallelWork
from vocoder.nn.wavenet import MelUpsampler, WaveNetStack

DTYPE = torch.float64


def tiny_stack(in_channels: int = 2, cond_channels: int = 3, **overrides) -> WaveNetStack:
    torch.manual_seed(0)
    kwargs = dict(in_channels=in_channels, out_channels=3, n_layers=5, cycle_length=3,
                  residual_channels=4, gate_channels=6, skip_channels=5, kernel_size=3,
                  cond_channels=cond_channels)
    kwargs.update(overrides)
    stack = WaveNetStack(**kwargs).to(DTYPE)
    with torch.no_grad():  # biases are zero at init: make every baked row matter
        for name, p in stack.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return stack


@pytest.mark.parametrize("requires_grad", [False, True])
def test_one_sigmoid_gate_is_the_negated_tanh_sigmoid_gate(requires_grad):
    a, b = torch.randn(3, 4, dtype=DTYPE), torch.randn(3, 4, dtype=DTYPE)
    pre = double_filter_half(torch.cat([a, b], dim=-1), dim=-1).requires_grad_(requires_grad)
    out = gate_(pre.clone() if requires_grad else pre, dim=-1)
    torch.testing.assert_close(out, -torch.tanh(a) * torch.sigmoid(b), rtol=0, atol=1e-14)


def test_bias_rows_read_the_negated_gate_beside_a_one():
    weight, bias, g = torch.randn(5, 4, dtype=DTYPE), torch.randn(5, dtype=DTYPE), \
        torch.randn(7, 4, dtype=DTYPE)
    gated = torch.cat([-g, torch.ones(7, 1, dtype=DTYPE)], dim=1)
    torch.testing.assert_close(gated @ bias_rows(weight, bias, 0.5), 0.5 * (g @ weight.t() + bias))


def test_first_layer_fold_through_the_input_affine_keeps_zero_padding():
    conv_weight = torch.randn(6, 4, 3, dtype=DTYPE)  # [G, R, k]
    input_weight, input_bias = torch.randn(4, 2, dtype=DTYPE), torch.randn(4, dtype=DTYPE)
    x = torch.randn(1, 2, 11, dtype=DTYPE)
    h = F.conv1d(x, input_weight[:, :, None], input_bias)
    expected = F.conv1d(F.pad(h, (4, 0)), conv_weight, dilation=2)
    x_one = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    folded = fold_input_affine(conv_weight, input_weight, input_bias)
    torch.testing.assert_close(F.conv1d(F.pad(x_one, (4, 0)), folded, dilation=2), expected)


def _affine_forward(stack, x, cond, scale):
    out = stack(x * scale, cond)
    return torch.stack([out[:, 0] * 3.0, out[:, 1] - 1.5, out[:, 2]], dim=1)


@pytest.mark.parametrize("cond_channels", [0, 3])
@pytest.mark.parametrize("kernel_size", [2, 3])
def test_incremental_steps_equal_the_forward(cond_channels, kernel_size):
    stack = tiny_stack(cond_channels=cond_channels, kernel_size=kernel_size)
    x = torch.randn(3, 2, 60, dtype=DTYPE)
    cond = torch.randn(3, cond_channels, 60, dtype=DTYPE) if cond_channels else None
    baked = bake_wavenet(stack, input_scale=0.5, output_scale=(3.0, 1.0, 1.0),
                         output_shift=(0.0, -1.5, 0.0), fold_first_layer=False)
    stepper = IncrementalStack(baked, batch=3)
    terms = stepper.conditioning_terms(cond) if cond_channels else [None] * 60
    for _ in range(2):  # the second pass after reset() starts from an empty history again
        stepped = torch.stack([stepper.step(x[:, :, t], terms[t]).clone() for t in range(60)], -1)
        torch.testing.assert_close(stepped, _affine_forward(stack, x, cond, 0.5))
        stepper.reset()


def test_incremental_period_is_the_lcm_of_the_tap_buffers():
    baked = bake_wavenet(tiny_stack(n_layers=3, cycle_length=3), fold_first_layer=False)
    assert IncrementalStack(baked, batch=1).period == 12  # kernel 3 x dilations 1, 2, 4
    with pytest.raises(ValueError, match="fold_first_layer"):
        IncrementalStack(bake_wavenet(tiny_stack()), batch=1)


@pytest.mark.parametrize("batch,frames,block_rows", [(1, 1, None), (2, 5, None), (2, 5, 16),
                                                     (3, 7, 48)])
def test_parallel_stack_equals_the_forward_on_upsampled_mels(batch, frames, block_rows,
                                                               monkeypatch):
    monkeypatch.setattr(parallel_module, "CPU_BLOCK_ROWS", block_rows)
    hop = 16
    torch.manual_seed(1)
    upsampler = MelUpsampler(5, hop, out_channels=3, upsample_scales=[4, 4]).to(DTYPE)
    stacks = [tiny_stack(in_channels=1, out_channels=2, n_layers=n) for n in (3, 4)]
    mel = torch.randn(batch, 5, frames, dtype=DTYPE)
    h = torch.randn(batch, frames * hop, dtype=DTYPE)
    engines = [ParallelStack(bake_wavenet(s, input_scale=2.0)) for s in stacks]
    work = ParallelWork(upsampler, engines, mel)
    cond = upsampler(mel)
    for stack, engine in zip(stacks, engines, strict=True):
        expected = stack(2.0 * F.pad(h, (1, -1)).unsqueeze(1), cond).transpose(1, 2)
        with torch.no_grad():
            torch.testing.assert_close(engine(h, work), expected, rtol=0, atol=1e-12)


def test_baked_weights_are_copies():
    stack = tiny_stack()
    baked = bake_wavenet(stack)
    before = baked.output_bias.clone()
    with torch.no_grad():
        stack.head[3].bias.add_(1.0)
    torch.testing.assert_close(baked.output_bias, before)
