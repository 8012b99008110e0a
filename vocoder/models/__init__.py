"""The one registry of models: kind name -> class, and loading from a checkpoint."""

from __future__ import annotations

import importlib

import torch

from vocoder.models.base import Vocoder

_REGISTRY = {
    "teacher": "vocoder.models.teacher:Teacher",
    "student": "vocoder.models.student:Student",
    "waveglow": "vocoder.models.waveglow:WaveGlow",
}

KINDS = tuple(_REGISTRY)


def model_class(kind: str) -> type[Vocoder]:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    module, name = _REGISTRY[kind].split(":")
    return getattr(importlib.import_module(module), name)


def model_from_arch(kind: str, n_mels: int, hop_length: int, arch: dict | None = None,
                    sample_rate: int | None = None) -> Vocoder:
    """A fresh model of ``kind`` for mels of ``n_mels`` bands and ``hop_length``, with the
    architecture keywords ``arch`` (``features`` is left ``None``: see :func:`build_model`).
    ``sample_rate`` (of the mel front end) completes an ``excitation`` keyword that lacks it
    (see :mod:`vocoder.nn.excitation`)."""
    arch = dict(arch or {})
    excitation = arch.get("excitation")
    if excitation not in (None, False) and sample_rate is not None:
        excitation = {} if excitation is True else dict(excitation)
        arch["excitation"] = {"sample_rate": int(sample_rate), **excitation}
    return model_class(kind)(n_mels=n_mels, hop_length=hop_length, **arch)


def build_model(kind: str, preset: str = "tacotron2", experiment: str = "debug",
                **arch_overrides) -> Vocoder:
    """A fresh (untrained) model of ``kind`` with the sizes of the ``experiment`` config preset
    (``conf/experiment/<experiment>.yaml``), any keyword overriding one of them, for mels of
    the front-end ``preset``, which the model carries as ``model.features``."""
    from vocoder.config import experiment_arch
    from vocoder.features import MelFrontEnd

    model_class(kind)  # unknown kinds fail here, before any file is read
    features = MelFrontEnd.from_preset(preset)
    arch = {**experiment_arch(experiment, kind), **arch_overrides}
    model = model_from_arch(kind, features.n_mels, features.hop_length, arch,
                            features.sample_rate)
    model.features = features
    return model


def model_from_checkpoint(ckpt: dict, use_ema: bool = True) -> Vocoder:
    """Rebuild the model a checkpoint dict describes (EMA weights when present)."""
    arch = dict(ckpt["arch"])
    # Checkpoints written before audio_scale existed hold models of raw amplitudes.
    arch.setdefault("audio_scale", 1.0)
    model = model_from_arch(ckpt["kind"], ckpt["n_mels"], ckpt["hop_length"], arch)
    state = ckpt.get("ema") if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    model.load_state_dict(state)
    return model


def load_model(path, device: str | torch.device = "cpu", use_ema: bool = True) -> Vocoder:
    """Load any checkpoint as a ready-to-synthesise model in eval mode.

    The returned model carries ``features`` (a :class:`~vocoder.features.MelFrontEnd` of the
    preset it was trained with) and ``checkpoint_path``.
    """
    from vocoder.checkpoint import CheckpointError, load_checkpoint
    from vocoder.features import MelFrontEnd

    ckpt = load_checkpoint(path)
    try:
        model = model_from_checkpoint(ckpt, use_ema=use_ema)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: does not fit this version's {ckpt.get('kind')} model "
                              f"({first})") from None
    model.features = MelFrontEnd.from_dict(ckpt["features"])
    model.checkpoint_path = str(path)
    # eval() after preparing: preparation builds new modules, which start in training mode.
    return model.prepare_for_inference().eval().to(device)
