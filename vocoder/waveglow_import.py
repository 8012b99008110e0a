"""Import NVIDIA's published WaveGlow weights into a flow-vocoder checkpoint.

The files are read as data by :func:`~vocoder.nvidia_checkpoint.read_nvidia_checkpoint`.
:func:`convert_nvidia_state_dict` maps NVIDIA's names onto :class:`WaveGlow`, reading the
architecture from the tensor shapes, and accepts the three layouts NVIDIA's WN went through
(one ``cond_layer`` or per-layer ``cond_layers``; ``res_skip_layers`` or separate
``res_layers``/``skip_layers``), with weight norm (``weight_g``/``weight_v``) or without.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from vocoder.errors import InputError, VocoderError
from vocoder.models.waveglow import WaveGlow
from vocoder.nvidia_checkpoint import read_nvidia_checkpoint

# ----------------------------------------------------------------------------- name mapping

@dataclass
class _Conv:
    """One convolution's weights: ``g``/``v`` (weight norm) or ``w``, and the bias."""

    bias: Tensor | None
    w: Tensor | None = None
    g: Tensor | None = None
    v: Tensor | None = None

    @property
    def normed(self) -> bool:
        return self.g is not None

    def plain(self) -> Tensor:
        if self.w is not None:
            return self.w
        v = self.v.double()
        norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
        return (self.g.double() * v / norm).to(self.v.dtype)


class _Reader:
    """Takes tensors out of a state dict by name and remembers which were used."""

    def __init__(self, state: dict[str, Tensor]):
        self.state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        self.used: set[str] = set()

    def has_conv(self, prefix: str) -> bool:
        return any(f"{prefix}.{s}" in self.state for s in ("weight", "weight_v"))

    def weight_shape(self, prefix: str) -> tuple[int, ...]:
        for suffix in ("weight", "weight_v"):
            if f"{prefix}.{suffix}" in self.state:
                return tuple(self.state[f"{prefix}.{suffix}"].shape)
        raise ValueError(f"missing {prefix}.weight")

    def take(self, name: str) -> Tensor:
        if name not in self.state:
            raise ValueError(f"missing {name}")
        self.used.add(name)
        return self.state[name]

    def conv(self, prefix: str) -> _Conv:
        bias = self.take(f"{prefix}.bias") if f"{prefix}.bias" in self.state else None
        if f"{prefix}.weight_v" in self.state:
            return _Conv(bias, g=self.take(f"{prefix}.weight_g"), v=self.take(f"{prefix}.weight_v"))
        return _Conv(bias, w=self.take(f"{prefix}.weight"))

    def count(self, prefix: str) -> int:
        n = 0
        while self.has_conv(f"{prefix}.{n}"):
            n += 1
        return n


def _concat(convs: list[_Conv]) -> _Conv:
    """Stack convolutions along output channels (weight norm is per output channel)."""
    bias = torch.cat([c.bias for c in convs]) if all(c.bias is not None for c in convs) else None
    if all(c.normed for c in convs):
        return _Conv(bias, g=torch.cat([c.g for c in convs]), v=torch.cat([c.v for c in convs]))
    return _Conv(bias, w=torch.cat([c.plain() for c in convs]))


def _flow_convs(reader: _Reader, i: int, n_layers: int) -> dict[str, _Conv]:
    """Flow ``i``'s WN convolutions in the newest layout, keyed by our module names."""
    p = f"WN.{i}"
    convs = {"start": reader.conv(f"{p}.start"), "end": reader.conv(f"{p}.end")}
    if reader.has_conv(f"{p}.cond_layer"):
        convs["cond_layer"] = reader.conv(f"{p}.cond_layer")
    else:
        convs["cond_layer"] = _concat([reader.conv(f"{p}.cond_layers.{j}")
                                       for j in range(n_layers)])
    for j in range(n_layers):
        convs[f"in_layers.{j}"] = reader.conv(f"{p}.in_layers.{j}")
        if reader.has_conv(f"{p}.res_skip_layers.{j}"):
            convs[f"res_skip_layers.{j}"] = reader.conv(f"{p}.res_skip_layers.{j}")
        else:
            skip = reader.conv(f"{p}.skip_layers.{j}")
            convs[f"res_skip_layers.{j}"] = (
                _concat([reader.conv(f"{p}.res_layers.{j}"), skip]) if j < n_layers - 1 else skip
            )
    return convs


def convert_nvidia_state_dict(state: dict[str, Tensor],
                              hop_length: int = 256) -> tuple[dict, dict[str, Tensor]]:
    """NVIDIA WaveGlow state dict -> ``(arch, ours)``: the keywords of :class:`WaveGlow` and
    its state dict (float32). ``n_mels`` is ``ours["upsample.weight"].shape[0]``; the upsampler
    stride is not stored in the weights, it is the mel hop (``hop_length``).

    Raises ``ValueError`` when the names or shapes do not make a WaveGlow.
    """
    reader = _Reader(state)
    up_w = reader.take("upsample.weight")
    n_mels, upsample_kernel = up_w.shape[0], up_w.shape[-1]
    invconv = []
    while f"convinv.{len(invconv)}.conv.weight" in reader.state:
        invconv.append(reader.take(f"convinv.{len(invconv)}.conv.weight"))
    if not invconv:
        raise ValueError("no convinv.0.conv.weight: not a WaveGlow state dict")
    channels = [w.shape[0] for w in invconv]
    drops = [k for k in range(1, len(channels)) if channels[k] != channels[k - 1]]
    n_early_every = drops[0] if drops else len(channels)
    n_early_size = channels[drops[0] - 1] - channels[drops[0]] if drops else 0

    n_channels = reader.weight_shape("WN.0.start")[0]
    n_layers = reader.count("WN.0.in_layers")
    kernel_size = reader.weight_shape("WN.0.in_layers.0")[-1]
    flows = [_flow_convs(reader, i, n_layers) for i in range(len(channels))]
    weight_norm = all(c.normed for f in flows for name, c in f.items() if name != "end")
    arch = dict(n_flows=len(channels), n_group=channels[0], n_early_every=n_early_every,
                n_early_size=n_early_size, n_layers=n_layers, n_channels=n_channels,
                kernel_size=kernel_size, invconv="plain", upsample_kernel=upsample_kernel,
                weight_norm=weight_norm, audio_scale=1.0)
    try:
        model = WaveGlow(n_mels, hop_length, **arch)
    except ValueError as e:
        raise ValueError(f"unsupported architecture {arch}: {e}") from None
    if model.flow_channels != channels:
        raise ValueError(f"1x1 convolution sizes {channels} do not follow WaveGlow's "
                         "early-output schedule")

    ours = {"upsample.weight": up_w, "upsample.bias": reader.take("upsample.bias")}
    for i, (w, convs) in enumerate(zip(invconv, flows, strict=True)):
        ours[f"invconvs.{i}.weight"] = w.reshape(w.shape[0], w.shape[1])
        for name, conv in convs.items():
            p = f"couplings.{i}.net.{name}"
            if weight_norm and name != "end":
                ours[f"{p}.weight_g"], ours[f"{p}.weight_v"] = conv.g, conv.v
            else:
                ours[f"{p}.weight"] = conv.plain()
            if conv.bias is not None:
                ours[f"{p}.bias"] = conv.bias
    unused = sorted(set(reader.state) - reader.used)
    if unused:
        raise ValueError(f"unexpected entries {', '.join(unused[:3])}"
                         + (" ..." if len(unused) > 3 else ""))
    try:
        model.load_state_dict(ours)
    except RuntimeError as e:
        raise ValueError(str(e).strip().splitlines()[-1].strip()) from None
    return model.arch_config(), model.state_dict()


def convert_waveglow(input_path: str | os.PathLike, output_path: str | os.PathLike,
                     features_preset: str = "tacotron2") -> WaveGlow:
    """Convert NVIDIA WaveGlow weights at ``input_path`` into a checkpoint at ``output_path``
    (written atomically, nothing on failure) with the given mel preset; returns the model."""
    from vocoder.checkpoint import make_checkpoint, save_checkpoint
    from vocoder.features import PRESETS

    if features_preset not in PRESETS:
        raise VocoderError(f"unknown mel preset {features_preset!r}; "
                           f"known: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[features_preset]
    state = read_nvidia_checkpoint(input_path)
    try:
        arch, ours = convert_nvidia_state_dict(state, hop_length=preset.hop_length)
    except ValueError as e:
        raise InputError(input_path, f"not a WaveGlow checkpoint ({e})") from None
    n_mels = ours["upsample.weight"].shape[0]
    if n_mels != preset.n_mels:
        raise InputError(input_path, f"has {n_mels} mel bands but preset {features_preset!r} "
                                     f"has {preset.n_mels}")
    model = WaveGlow(n_mels, preset.hop_length, **arch)
    model.load_state_dict(ours)
    ckpt = make_checkpoint(model, preset.to_dict(),
                           extra={"converted_from": "nvidia-waveglow", "source": str(input_path)})
    try:
        save_checkpoint(ckpt, output_path)
    except OSError as e:
        raise InputError(output_path, f"cannot write ({e.strerror or e})") from None
    return model
