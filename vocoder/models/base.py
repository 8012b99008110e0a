"""What every vocoder in the registry provides.

Shapes: ``B`` batch, ``T`` audio samples, ``F`` mel frames, ``T = F * hop_length`` whenever audio
and mels come in pairs (training segments start on a frame boundary).
"""

from __future__ import annotations

from typing import Self

import torch
from torch import Tensor, nn


class Vocoder(nn.Module):
    """Base class of the three model kinds.

    Subclasses set ``kind`` and accept ``n_mels`` and ``hop_length`` plus their own
    architecture keywords, which :meth:`arch_config` returns so the registry can rebuild the
    model from a checkpoint.
    """

    kind: str = ""
    #: Set by :meth:`prepare_for_inference`, whose layout (weight norm removed, layers fused)
    #: no checkpoint can hold: :func:`~vocoder.checkpoint.make_checkpoint` refuses it.
    prepared: bool = False

    def __init__(self, n_mels: int, hop_length: int):
        super().__init__()
        self.n_mels = n_mels
        self.hop_length = hop_length
        #: The :class:`~vocoder.features.MelFrontEnd` whose mels the model reads, set by
        #: :func:`~vocoder.models.build_model` and :func:`~vocoder.models.load_model` (``None``
        #: for a model built from its class alone). Its buffers are not in the state dict.
        self.features = None
        #: The :class:`~vocoder.nn.excitation.Excitation` of a model that reads an excitation
        #: source (set by the subclass from its ``excitation`` keyword), else ``None``.
        self.excitation = None

    def check_mel_shape(self, mel: Tensor, length: int) -> None:
        """Raise ``ValueError`` unless ``mel`` is ``[B, n_mels, length // hop_length]``."""
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"mel must be [B, {self.n_mels}, F], got {tuple(mel.shape)}")
        if mel.shape[-1] * self.hop_length != length:
            raise ValueError(f"{length} samples need {length / self.hop_length:g} mel frames "
                             f"(hop {self.hop_length}), got {mel.shape[-1]}")

    def arch_config(self) -> dict:
        """Keyword arguments (besides ``n_mels``/``hop_length``) that rebuild this model."""
        raise NotImplementedError

    def training_loss(self, audio: Tensor, mel: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Loss to minimise on a batch of ``audio [B, T]`` and ``mel [B, n_mels, T // hop]``,
        and scalar metrics to log. Models trained by maximum likelihood return the negative
        log-likelihood in nats per sample."""
        raise NotImplementedError

    def synthesize(self, mel: Tensor, sigma: float | None = None,
                   z: Tensor | None = None) -> Tensor:
        """``mel [B, n_mels, F]`` -> audio ``[B, F * hop_length]``. ``z [B, F * hop_length]`` is
        standard normal latent noise (drawn when ``None``; given, the result is
        deterministic), scaled by ``sigma`` (``None`` means the model's default)."""
        raise NotImplementedError

    def source(self, mel: Tensor) -> Tensor | None:
        """The excitation source ``[B, K, F * hop]`` that ``mel [B, n_mels, F]`` implies (no
        gradient; :meth:`~vocoder.nn.excitation.Excitation.from_mel`), or ``None`` for a model
        without one."""
        if self.excitation is None:
            return None
        with torch.no_grad():
            return self.excitation.from_mel(mel.to(next(self.excitation.parameters())))

    def noise(self, mel: Tensor, z: Tensor | None = None) -> Tensor:
        """The latent noise for ``mel [B, n_mels, F]``: ``z`` checked to be ``[B, F * hop]``, or
        drawn from N(0, 1); in the mel's device and dtype."""
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"mel must be [B, {self.n_mels}, F], got {tuple(mel.shape)}")
        shape = (mel.shape[0], mel.shape[-1] * self.hop_length)
        if z is None:
            return torch.randn(shape, device=mel.device, dtype=mel.dtype)
        if tuple(z.shape) != shape:
            raise ValueError(f"z must be {list(shape)} for this mel, got {list(z.shape)}")
        return z.to(mel)

    def _in_model_dtype(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The inputs in the model's floating dtype (soundfile reads float64, say); a no-op,
        gradient included, when they already are."""
        dtype = next(self.parameters()).dtype
        return tuple(t.to(dtype) for t in tensors)

    def prepare_for_inference(self) -> Self:
        """Make inference fast (remove weight norm, cache inverses). Idempotent; returns self.
        The model cannot be saved as a checkpoint afterwards (save before)."""
        self.prepared = True
        return self
