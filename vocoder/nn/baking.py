"""One baking step from a trained WaveNet to the matrices its fast inference forms run.

Every inference engine of the project (the teacher's incremental sampler, the student's
parallel flows, WaveGlow's fused WN) rests on the same three rewrites, derived here once:

* **one-sigmoid gate.** ``tanh(a) = 2 sigmoid(2a) - 1``, so with the filter half of the gate's
  pre-activations doubled, ``s = sigmoid(pre)`` gives ``s_b - 2 s_a s_b = -tanh(a) sigmoid(b)``
  (one ``addcmul``; :func:`gate_`). The sign is folded into the 1x1 convolutions that read the
  gate (:func:`double_filter_half` doubles; the 1x1 weights are negated);
* **biases as rows.** A gated output stored beside a constant 1, ``[-g, 1]``, turns a 1x1
  ``W g + b`` into one product with ``[-W^T; b]`` (:func:`bias_rows`);
* **the first layer through the input.** A stack's first dilated convolution reads
  ``h = W_in x + b_in``, an affine function of the few input channels, so its taps act on
  ``(x, 1)`` with weights ``W_k [W_in | b_in]`` (:func:`fold_input_affine`): ``C_in + 1``
  columns instead of the residual channels. Zero padding of ``h`` becomes zero padding of
  ``(x, 1)``, the constant channel included, so the fold is exact at the edges too.

:func:`bake_wavenet` applies them to a causal :class:`~vocoder.nn.wavenet.WaveNetStack`
(teacher, student), with an optional input scale and output affine (a model's
``audio_scale``), into a :class:`BakedWaveNet` of time-major matrices. The products are formed
in float64 and then cast, so the baked form equals the module to rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from vocoder.nn.weight_norm import conv_weight

SQRT_HALF = math.sqrt(0.5)


def double_filter_half(t: Tensor, dim: int = 0) -> Tensor:
    """A copy of ``t`` with the first half of dimension ``dim`` (the gate's filter half)
    doubled: the pre-activations :func:`gate_` expects."""
    scale = torch.ones(t.shape[dim], dtype=t.dtype, device=t.device)
    scale[:t.shape[dim] // 2] = 2.0
    shape = [1] * t.dim()
    shape[dim] = -1
    return t * scale.view(shape)


def gate_(pre: Tensor, dim: int = -1, out: Tensor | None = None) -> Tensor:
    """The WaveNet gate ``tanh(a) * sigmoid(b)`` with its sign flipped, from pre-activations
    ``pre = (2a, b)`` along ``dim`` (see :func:`double_filter_half`): ``-tanh(a) sigmoid(b)``,
    half as wide as ``pre``.

    Without autograd (and outside ``torch.compile``, which cannot trace ``out=`` into a strided
    view) ``pre`` is overwritten by its sigmoid and the result goes to ``out`` (default: the
    filter half of ``pre``); otherwise it is computed functionally.
    """
    half = pre.shape[dim] // 2
    if pre.requires_grad or torch.compiler.is_compiling():
        s = torch.sigmoid(pre)
        a, b = s.narrow(dim, 0, half), s.narrow(dim, half, half)
        return torch.addcmul(b, a, b, value=-2.0)
    s = pre.sigmoid_()
    a, b = s.narrow(dim, 0, half), s.narrow(dim, half, half)
    return torch.addcmul(b, a, b, value=-2.0, out=a if out is None else out)


def bound_gate(pre: Tensor, out: Tensor, dim: int = -1) -> Callable[[], Tensor]:
    """:func:`gate_` on fixed buffers as a call without arguments, its views made once: for
    hot loops whose per-call Python overhead matters (the teacher's sampling step)."""
    half = pre.shape[dim] // 2
    filter_half, gate_half = pre.narrow(dim, 0, half), pre.narrow(dim, half, half)

    def run() -> Tensor:
        pre.sigmoid_()
        return torch.addcmul(gate_half, filter_half, gate_half, value=-2.0, out=out)

    return run


def bias_rows(weight: Tensor, bias: Tensor | None, scale: float = 1.0) -> Tensor:
    """A 1x1 convolution ``W g + b`` (``weight [O, I]`` or ``[O, I, 1]``, ``bias [O]``) as the
    matrix ``scale * [-W^T; b]`` ``[I + 1, O]`` that the sign-flipped gate ``[-g, 1]``
    (:func:`gate_`) multiplies from the left."""
    weight = weight.reshape(weight.shape[0], -1)
    bias = torch.zeros_like(weight[:, 0]) if bias is None else bias
    return torch.cat([-weight.t(), bias[None]]) * scale


def fold_input_affine(tap_weight: Tensor, input_weight: Tensor,
                      input_bias: Tensor) -> Tensor:
    """Conv weights ``[G, R, k]`` reading ``h = input_weight [R, C_in] x + input_bias [R]``
    -> weights ``[G, C_in + 1, k]`` reading ``(x, 1)``, computed in float64."""
    affine = torch.cat([input_weight.reshape(input_weight.shape[0], -1),
                        input_bias[:, None]], dim=1).double()
    return torch.einsum("grk,rc->gck", tap_weight.double(), affine)


@dataclasses.dataclass
class BakedLayer:
    """One gated residual layer, time-major: rows are time steps.

    ``gate_bias [G]`` (filter half doubled); ``taps``: ``(shift, weight [C, G])`` per kernel
    tap, oldest first, the tap reading the input ``shift`` steps back (the first layer's
    ``C`` is the stack's ``C_in + 1``, reading ``(x, 1)``); ``skip [G/2 + 1, S]`` with the
    stack's ``sqrt(1 / n_layers)`` folded in; ``residual [G/2 + 1, R]`` with ``sqrt(1/2)``
    folded in (``None`` for the last layer), so ``h_next = sqrt(1/2) h + [-g, 1] residual``.
    """

    gate_bias: Tensor
    taps: list[tuple[int, Tensor]]
    skip: Tensor
    residual: Tensor | None

    def flat_taps(self) -> Tensor:
        """All taps as one ``[k * C, G]`` matrix for inputs laid out oldest first."""
        return torch.cat([weight for _, weight in self.taps]).contiguous()


@dataclasses.dataclass
class BakedWaveNet:
    """A causal WaveNet stack baked for inference (see the module docstring).

    ``input_weight [C_in, R]``, ``input_bias [R]``: the input 1x1 (input scale folded in);
    ``cond_weight [C_cond, n_layers * G]`` (``None`` when unconditional): every layer's
    conditioning 1x1, filter halves doubled; ``layers``; the head ``relu -> hidden -> relu ->
    output`` as ``hidden_weight [S, S]``, ``hidden_bias``, ``output_weight [S, C_out]``,
    ``output_bias`` (output affine folded in); ``first_layer_folded``: whether the first
    layer's taps read ``(x, 1)`` rather than ``h``.
    """

    input_weight: Tensor
    input_bias: Tensor
    cond_weight: Tensor | None
    layers: list[BakedLayer]
    hidden_weight: Tensor
    hidden_bias: Tensor
    output_weight: Tensor
    output_bias: Tensor
    first_layer_folded: bool

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def gate_channels(self) -> int:
        return self.layers[0].gate_bias.shape[0]

    @property
    def residual_channels(self) -> int:
        return self.input_weight.shape[1]

    @property
    def skip_channels(self) -> int:
        return self.hidden_weight.shape[0]

    @property
    def out_channels(self) -> int:
        return self.output_weight.shape[1]

    @property
    def padding(self) -> int:
        """The longest look-back of any tap (time steps)."""
        return max(shift for layer in self.layers for shift, _ in layer.taps)


@torch.no_grad()
def bake_wavenet(stack, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None,
                 input_scale: float | Sequence[float] = 1.0,
                 output_scale: Sequence[float] | None = None,
                 output_shift: Sequence[float] | None = None,
                 fold_first_layer: bool = True) -> BakedWaveNet:
    """Bake a :class:`~vocoder.nn.wavenet.WaveNetStack` (weight norm removed or not) for
    inference on ``device`` in ``dtype`` (default: the stack's).

    The baked stack computes ``output_scale * stack(input_scale * x, cond) + output_shift``
    (``input_scale`` one number or one per input channel, the output affine per output
    channel; defaults 1 and 0). ``fold_first_layer`` folds the first layer's
    taps through the input 1x1 (:func:`fold_input_affine`); without it they read the residual
    stream ``h = W_in x + b_in`` like every other layer. The weights are copied: bake again
    after they change.
    """
    ref = conv_weight(stack.input)
    device = ref.device if device is None else device
    dtype = ref.dtype if dtype is None else dtype

    def baked(t: Tensor) -> Tensor:
        return t.detach().to(device, dtype).contiguous()

    def weight_of(conv) -> Tensor:
        return conv_weight(conv).double()

    n_layers = stack.n_layers
    input_weight = weight_of(stack.input)[:, :, 0]  # [R, C_in]
    input_weight = input_weight * torch.as_tensor(input_scale, dtype=torch.float64,
                                                  device=input_weight.device)
    input_bias = stack.input.bias.double()
    skip_scale = math.sqrt(1.0 / n_layers)
    layers = []
    for i, block in enumerate(stack.blocks):
        conv = block.conv
        weight = double_filter_half(weight_of(conv.conv))  # [G, R, k]
        if i == 0 and fold_first_layer:
            weight = fold_input_affine(weight, input_weight, input_bias)
        k, d = conv.kernel_size, conv.dilation
        n_res = block.residual_channels if block.has_residual else 0
        out_weight, out_bias = weight_of(block.out), block.out.bias.double()
        layers.append(BakedLayer(
            gate_bias=baked(double_filter_half(conv.conv.bias.double())),
            taps=[((k - 1 - j) * d, baked(weight[:, :, j].t())) for j in range(k)],
            skip=baked(bias_rows(out_weight[n_res:], out_bias[n_res:], skip_scale)),
            residual=(baked(bias_rows(out_weight[:n_res], out_bias[:n_res], SQRT_HALF))
                      if n_res else None),
        ))
    cond_weight = None
    if stack.cond is not None:
        cond = weight_of(stack.cond)[:, :, 0].view(n_layers, stack.gate_channels, -1)
        cond_weight = baked(double_filter_half(cond, dim=1).reshape(-1, cond.shape[-1]).t())
    head_out = stack.head[3]
    scale = torch.ones(stack.out_channels, dtype=torch.float64, device=ref.device)
    shift = torch.zeros_like(scale)
    if output_scale is not None:
        scale = scale * torch.as_tensor(output_scale, dtype=torch.float64, device=ref.device)
    if output_shift is not None:
        shift = shift + torch.as_tensor(output_shift, dtype=torch.float64, device=ref.device)
    return BakedWaveNet(
        input_weight=baked(input_weight.t()),
        input_bias=baked(input_bias),
        cond_weight=cond_weight,
        layers=layers,
        hidden_weight=baked(weight_of(stack.head[1])[:, :, 0].t()),
        hidden_bias=baked(stack.head[1].bias),
        output_weight=baked(weight_of(head_out)[:, :, 0].t() * scale),
        output_bias=baked(head_out.bias.double() * scale + shift),
        first_layer_folded=fold_first_layer,
    )
