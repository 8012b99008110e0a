"""The one checkpoint format: written atomically, read as data only.

A checkpoint is a plain dict of tensors and Python containers::

    format, format_version       "flow-vocoder", CHECKPOINT_VERSION
    kind                         "teacher" | "student" | "waveglow"
    n_mels, hop_length, arch     what the registry needs to rebuild the model
    features                     the MelConfig dict the model was trained with
    model                        state dict (training form, e.g. with weight norm)
    ema                          state dict of the exponential moving average, or None
    step                         optimiser steps taken
    optimizer, scheduler         state dicts (absent in converted / exported checkpoints)
    rng, data_state              what exact resume needs
    config                       the full resolved run config (nested dict)
    metrics                      last validation metrics
    extra                        anything a model kind adds (e.g. the student's teacher)

It is loaded with ``torch.load(weights_only=True)``: a checkpoint never runs code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vocoder.atomic import atomic_path
from vocoder.errors import CheckpointError

FORMAT = "flow-vocoder"
CHECKPOINT_VERSION = 1


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` atomically and durably (temp file, fsync, rename)."""
    with atomic_path(path, durable=True) as tmp:
        torch.save(obj, tmp)


def make_checkpoint(model, features: dict, **fields) -> dict:
    """The dict for ``model`` (a registered :class:`~vocoder.models.base.Vocoder`).

    Refuses a model after ``prepare_for_inference``: its state dict (weight norm removed,
    layers fused) no longer fits the model a checkpoint rebuilds.
    """
    if getattr(model, "prepared", False):
        raise CheckpointError(f"cannot save this {model.kind}: prepare_for_inference() has "
                              "changed its layout; save it before preparing it, or save the "
                              "checkpoint it was loaded from")
    ckpt = {
        "format": FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "kind": model.kind,
        "n_mels": model.n_mels,
        "hop_length": model.hop_length,
        "arch": model.arch_config(),
        "features": dict(features),
        "model": model.state_dict(),
        "ema": None,
        "step": 0,
        "config": {},
        "metrics": {},
        "extra": {},
    }
    ckpt.update(fields)
    return ckpt


def save_checkpoint(ckpt: dict, path: str | os.PathLike) -> None:
    atomic_torch_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", kind: str | None = None) -> dict:
    """Read and validate a checkpoint; ``kind`` (if given) must match."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a flow-vocoder checkpoint")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this toolkit "
            f"understands ({CHECKPOINT_VERSION}); upgrade flow-vocoder"
        )
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a {ckpt.get('kind')} model, expected a {kind}")
    return ckpt
