"""The one mel front end: named presets, batched log-mel extraction on CPU or CUDA.

Every part of the toolkit (data preparation, training, synthesis, evaluation) computes
mels through :class:`MelFrontEnd`, and every checkpoint stores the preset it was trained
with, so a checkpoint alone says which mels it accepts.

Framing, for ``T`` input samples and hop ``H``:

* ``center=True`` presets (``tacotron2``): the signal is reflect-padded by ``n_fft // 2``
  on both sides, giving ``T // H + 1`` frames. Frame ``i`` is centred on sample ``i * H``.
* ``hifigan``: reflect-padded by ``(n_fft - H) // 2`` on both sides without centring,
  giving ``(T - H) // H + 1`` frames, i.e. ``T // H`` when ``T`` is a multiple of ``H``.

Synthesis maps ``F`` frames back to exactly ``F * H`` samples.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MelConfig:
    """All numbers that define a log-mel spectrogram."""

    name: str
    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float = 8000.0
    center: bool = True
    # Reflect padding on each side when ``center`` is False (HiFi-GAN framing).
    pad: int = 0
    # Added to |X|^2 before the square root (HiFi-GAN uses 1e-9); 0 means plain |X|.
    magnitude_eps: float = 0.0
    log_floor: float = 1e-5

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


PRESETS: dict[str, MelConfig] = {
    # Tacotron2 / WaveGlow / NVIDIA's stack: centred reflect padding, plain magnitude.
    "tacotron2": MelConfig(name="tacotron2"),
    # HiFi-GAN (V1 configs): manual reflect padding of (n_fft - hop) / 2, no centring,
    # sqrt(|X|^2 + 1e-9).
    "hifigan": MelConfig(name="hifigan", center=False, pad=(1024 - 256) // 2, magnitude_eps=1e-9),
    # 16 kHz speech (a common choice for LibriTTS/VCTK-derived setups).
    "speech16k": MelConfig(
        name="speech16k", sample_rate=16000, n_fft=1024, hop_length=200, win_length=800,
        fmax=8000.0,
    ),
}


class MelFrontEnd(nn.Module):
    """Audio ``[T]`` or ``[B, T]`` (float, in [-1, 1]) -> natural-log mels ``[n_mels, F]`` or
    ``[B, n_mels, F]``.

    The mel filterbank is librosa's (Slaney scale and normalisation), the window a periodic
    Hann. Buffers follow ``.to(device)`` but stay float32 whatever dtype the module is cast
    to (a model cast to bf16 carries its front end along), and the input is moved to the
    buffers' device and computed in float32; the module has no trainable parameters.
    """

    def __init__(self, config: MelConfig):
        super().__init__()
        self.config = config
        import librosa  # imported here: only the filterbank needs it

        basis = librosa.filters.mel(
            sr=config.sample_rate, n_fft=config.n_fft, n_mels=config.n_mels,
            fmin=config.fmin, fmax=config.fmax, htk=False, norm="slaney",
        )
        self.register_buffer("mel_basis", torch.from_numpy(basis).float(), persistent=False)
        self.register_buffer(
            "window", torch.hann_window(config.win_length, periodic=True), persistent=False
        )

    def _apply(self, fn, recurse=True):
        # Follow moves, undo casts: a cast buffer is replaced by the float32 original on the
        # new device (casting back would keep the rounding).
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.dtype != torch.float32:
                self._buffers[name] = before[name].to(buffer.device)
        return self

    @classmethod
    def from_preset(cls, name: str = "tacotron2") -> MelFrontEnd:
        if name not in PRESETS:
            raise ValueError(f"unknown mel preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> MelFrontEnd:
        return cls(MelConfig.from_dict(d))

    # Convenient read-only views of the config.
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def n_mels(self) -> int:
        return self.config.n_mels

    @property
    def log_floor(self) -> float:
        return self.config.log_floor

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for ``num_samples`` input samples."""
        c = self.config
        if c.center:
            return num_samples // c.hop_length + 1
        return (num_samples + 2 * c.pad - c.n_fft) // c.hop_length + 1

    def min_samples(self) -> int:
        """Shortest input that reflect padding accepts."""
        c = self.config
        return (c.n_fft // 2 + 1) if c.center else max(c.pad + 1, c.n_fft - 2 * c.pad)

    def magnitude(self, audio: Tensor) -> Tensor:
        """Linear STFT magnitude ``[B, n_fft // 2 + 1, F]`` of ``[B, T]`` audio."""
        c = self.config
        x = audio.to(device=self.window.device, dtype=torch.float32)
        if not c.center and c.pad > 0:
            x = torch.nn.functional.pad(x.unsqueeze(1), (c.pad, c.pad), mode="reflect").squeeze(1)
        spec = torch.stft(
            x, n_fft=c.n_fft, hop_length=c.hop_length, win_length=c.win_length,
            window=self.window, center=c.center, pad_mode="reflect", normalized=False,
            onesided=True, return_complex=True,
        )
        if c.magnitude_eps > 0:
            return torch.sqrt(spec.real.square() + spec.imag.square() + c.magnitude_eps)
        return spec.abs()

    def forward(self, audio: Tensor) -> Tensor:
        if audio.dim() not in (1, 2):
            raise ValueError(f"MelFrontEnd expects audio [T] or [B, T], got {tuple(audio.shape)}")
        squeeze = audio.dim() == 1
        x = audio.unsqueeze(0) if squeeze else audio
        if x.shape[-1] < self.min_samples():
            raise ValueError(
                f"audio of {x.shape[-1]} samples is too short for preset "
                f"{self.config.name!r} (needs at least {self.min_samples()})"
            )
        mel = torch.matmul(self.mel_basis, self.magnitude(x))
        log_mel = torch.log(torch.clamp(mel, min=self.config.log_floor))
        return log_mel.squeeze(0) if squeeze else log_mel

    def silence_level(self) -> float:
        """The log-mel value of digital silence (``ln(log_floor)``)."""
        return float(np.log(self.config.log_floor))

    def extra_repr(self) -> str:
        c = self.config
        return (f"preset={c.name}, sr={c.sample_rate}, n_fft={c.n_fft}, hop={c.hop_length}, "
                f"win={c.win_length}, n_mels={c.n_mels}, fmin={c.fmin}, fmax={c.fmax}")
