"""Device and dtype helpers shared by the commands: one place for what ``device=``,
``dtype=`` and timing need."""

from __future__ import annotations

import torch

from vocoder.errors import VocoderError

# "tf32": float32 weights and data, with TF32 tensor-core matmuls/convolutions on CUDA.
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
          "bf16": torch.bfloat16}


def set_tf32(enabled: bool) -> None:
    """Allow (or forbid) TF32 for CUDA matmuls and cuDNN convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda[:N]`` or ``auto`` (CUDA when visible) as a device; a CUDA device that is
    not there, or any other name, is a one-line :class:`~vocoder.errors.VocoderError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VocoderError(f"device={name} was asked for but CUDA is not available")
    if name != "cpu" and not name.startswith("cuda"):
        raise VocoderError(f"device must be cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): call before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
