"""Bias denoiser (as shipped with NVIDIA's WaveGlow): subtract the spectrum a vocoder produces
for silence from the magnitude of its output.

A flow vocoder fed a silent mel with ``sigma = 0`` still emits a faint, steady hiss or hum: its
"bias". :class:`Denoiser` measures that once and removes a fraction of it from every STFT frame
of later output, keeping the output's phase.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# ln(1e-5): the log-mel value of digital silence in the tacotron2 preset
# (``MelFrontEnd.silence_level()``).
SILENCE_LEVEL = math.log(1e-5)


class Denoiser(nn.Module):
    """Bias-spectrum subtraction for ``model`` (any vocoder with ``synthesize(mel, sigma)``).

    ``bias_spectrum [n_fft // 2 + 1, 1]`` is the STFT magnitude, averaged over frames, of the
    model's output for ``n_frames`` mel frames all at ``silence_level`` with ``sigma = 0``.
    """

    def __init__(self, model: nn.Module, silence_level: float = SILENCE_LEVEL,
                 n_frames: int = 88, n_fft: int = 1024, hop_length: int = 256,
                 win_length: int = 1024):
        super().__init__()
        self.n_fft, self.hop_length, self.win_length = n_fft, hop_length, win_length
        ref = next(model.parameters())
        self.register_buffer("window", torch.hann_window(win_length, device=ref.device),
                             persistent=False)
        mel = torch.full((1, model.n_mels, n_frames), float(silence_level), device=ref.device,
                         dtype=ref.dtype)
        with torch.no_grad():
            bias_audio = model.synthesize(mel, sigma=0.0).float()
        magnitude = self._stft(bias_audio).abs()
        self.register_buffer("bias_spectrum", magnitude.mean(dim=-1, keepdim=True)[0])

    def _stft(self, audio: Tensor) -> Tensor:
        return torch.stft(audio, self.n_fft, self.hop_length, self.win_length,
                          window=self.window, center=True, pad_mode="reflect",
                          return_complex=True)

    @torch.no_grad()
    def forward(self, audio: Tensor, strength: float = 0.1) -> Tensor:
        """``audio [B, T]`` or ``[T]`` -> the same shape with ``strength * bias_spectrum``
        taken off every frame's magnitude (floored at 0), resynthesised with the original
        phase."""
        squeeze = audio.dim() == 1
        x = audio.float().reshape(-1, audio.shape[-1])
        spec = self._stft(x)
        magnitude = (spec.abs() - strength * self.bias_spectrum).clamp_(min=0.0)
        spec = torch.polar(magnitude, spec.angle())
        out = torch.istft(spec, self.n_fft, self.hop_length, self.win_length,
                          window=self.window, center=True, length=x.shape[-1])
        out = out.to(audio.dtype)
        return out[0] if squeeze else out

    denoise = forward
