"""Audio file I/O (soundfile only) with clear, one-line errors.

All audio inside the toolkit is mono float32 in [-1, 1] at the mel preset's rate. Loading
down-mixes and resamples (torchaudio's windowed-sinc resampler) and reports doing so once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from vocoder.atomic import atomic_path
from vocoder.errors import InputError

AUDIO_EXTENSIONS = (".wav", ".flac")
_announced: set[tuple[str, int, int]] = set()


def _announce(kind: str, src: int, dst: int, log) -> None:
    key = (kind, src, dst)
    if key not in _announced and log is not None:
        _announced.add(key)
        if kind == "resample":
            log(f"note: resampling audio from {src} Hz to {dst} Hz")
        else:
            log(f"note: down-mixing {src}-channel audio to mono")


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling of ``audio [T]`` (float32)."""
    if orig_sr == target_sr:
        return audio
    import torchaudio.functional as AF

    out = AF.resample(torch.from_numpy(np.ascontiguousarray(audio)), orig_sr, target_sr)
    return out.numpy().astype(np.float32, copy=False)


def load_audio(path: str | os.PathLike, sample_rate: int, log=print) -> np.ndarray:
    """Read ``path`` as mono float32 ``[T]`` at ``sample_rate``.

    Raises :class:`InputError` (message names the file and the problem) for files that are
    missing, undecodable, empty or hold NaN/Inf.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - libsndfile errors have many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(path, f"cannot decode audio ({reason})") from None
    if data.size == 0:
        raise InputError(path, "no audio samples")
    if not np.isfinite(data).all():
        raise InputError(path, "contains NaN or Inf samples")
    if data.shape[1] > 1:
        _announce("downmix", data.shape[1], 1, log)
        audio = data.mean(axis=1)
    else:
        audio = data[:, 0]
    if sr != sample_rate:
        _announce("resample", sr, sample_rate, log)
        audio = resample(audio, sr, sample_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def write_wav(path: str | os.PathLike, audio, sample_rate: int) -> None:
    """Write 16-bit PCM mono, atomically: a crash never leaves a partial file at ``path``."""
    path = Path(path)
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().float().cpu().numpy()
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    audio = np.nan_to_num(audio, nan=0.0, posinf=1.0, neginf=-1.0)
    pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
    with atomic_path(path) as tmp:
        sf.write(tmp, pcm, sample_rate, subtype="PCM_16", format="WAV")


def list_audio_files(root: str | os.PathLike) -> list[Path]:
    """Every .wav/.flac below ``root``, sorted (deterministic order)."""
    root = Path(root)
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
    )
