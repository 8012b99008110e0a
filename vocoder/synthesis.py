"""Mel -> waveform for any checkpoint: input reading and checking, batching by length, long
inputs in overlapping chunks with cross-fades.

Shapes: mels ``[n_mels, F]`` (natural-log, the checkpoint's preset), audio ``[F * hop]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vocoder.audio import AUDIO_EXTENSIONS, load_audio
from vocoder.errors import InputError, VocoderError
from vocoder.nn.excitation import SourcePieces

MEL_EXTENSIONS = (".npy",)


@dataclass
class SynthInput:
    path: Path
    mel: np.ndarray  # float32 [n_mels, F]


def list_inputs(path: str | Path) -> list[Path]:
    """A single file, or every .npy/.wav/.flac in a folder (not recursive), sorted."""
    path = Path(path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in MEL_EXTENSIONS + AUDIO_EXTENSIONS
        )
        if not files:
            raise VocoderError(f"{path}: no .npy, .wav or .flac files in this folder")
        return files
    if not path.exists():
        raise VocoderError(f"{path}: input not found")
    return [path]


def check_mel(mel: np.ndarray, path: Path, features) -> np.ndarray:
    """Validate a log-mel array against the checkpoint's preset; explain any mismatch."""
    if mel.ndim == 3 and mel.shape[0] == 1:
        mel = mel[0]
    if mel.ndim != 2:
        raise InputError(path, f"mel must be [n_mels, frames], got shape {tuple(mel.shape)}")
    n_mels = features.n_mels
    if mel.shape[0] != n_mels:
        if mel.shape[1] == n_mels:
            raise InputError(
                path,
                f"mel is [frames, n_mels] = {tuple(mel.shape)}; save it "
                f"transposed as [n_mels, frames] = [{n_mels}, {mel.shape[0]}]",
            )
        raise InputError(
            path,
            f"mel has {mel.shape[0]} bands but the checkpoint's preset "
            f"{features.config.name!r} has {n_mels}",
        )
    if mel.shape[1] < 1:
        raise InputError(path, "mel has no frames")
    if not np.isfinite(mel).all():
        raise InputError(path, "mel holds NaN or Inf values")
    floor = math.log(features.log_floor)  # ln(1e-5) = -11.51 for the common presets
    lo, hi, mean = float(mel.min()), float(mel.max()), float(mel.mean())
    # Acoustic models' predicted mels are not clamped and can dip a little below the floor
    # that every training mel stops at: those values are raised to it. A natural-log mel far
    # below it (e^-19.5 is 3e-9 of full scale) is a mel in another unit.
    if lo < floor - 8.0 or hi > 8.0:
        raise InputError(
            path,
            f"mel values span [{lo:.1f}, {hi:.1f}], outside the natural-log "
            f"range [{floor:.1f}, ~3] of this checkpoint (a dB-scaled mel? "
            f"convert with mel_db * ln(10) / 20)",
        )
    # A log10 mel clamped at the same floor bottoms out at exactly log10(floor) = -5.
    log10_floor = floor / math.log(10)
    if abs(lo - log10_floor) < 0.02 and float((mel <= lo + 0.02).mean()) > 0.005:
        raise InputError(
            path,
            f"mel values span [{lo:.1f}, {hi:.1f}], which looks like a log10 "
            f"mel; this checkpoint takes natural-log mels: multiply by "
            f"ln(10) = 2.3026",
        )
    if abs(mean) < 0.5 and -6.0 < lo and hi < 6.0 and abs(float(mel.std()) - 1.0) < 0.3:
        raise InputError(
            path,
            f"mel looks mean/variance normalised (mean {mean:.2f}, std "
            f"{float(mel.std()):.2f}); this checkpoint takes raw natural-log "
            f"mels: undo the normalisation first",
        )
    return np.maximum(mel, floor).astype(np.float32, copy=False)


def read_input(path: Path, features, log=print) -> SynthInput:
    """A ``.npy`` log-mel, or a ``.wav``/``.flac`` turned into its mel (copy-synthesis)."""
    if path.suffix.lower() in MEL_EXTENSIONS:
        try:
            mel = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - corrupt files raise many types
            raise InputError(
                path, f"cannot read .npy ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None
        if not np.issubdtype(mel.dtype, np.floating):
            raise InputError(path, f"mel must hold floats, got {mel.dtype}")
        return SynthInput(path, check_mel(mel, path, features))
    if path.suffix.lower() in AUDIO_EXTENSIONS:
        audio = load_audio(path, features.sample_rate, log=log)
        if len(audio) < features.min_samples():
            raise InputError(path, f"too short ({len(audio)} samples) for a mel")
        with torch.no_grad():
            mel = features(torch.from_numpy(audio)).cpu().numpy()
        return SynthInput(path, mel)
    raise InputError(path, "not a .npy mel or .wav/.flac audio file")


def _fade(n: int, device, dtype) -> torch.Tensor:
    """Raised-cosine fade-in of ``n`` samples (fade-out is ``1 - fade``)."""
    t = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / n
    return (0.5 - 0.5 * torch.cos(math.pi * t)).to(dtype)


@torch.no_grad()
def synthesize_streamed(model, mel: torch.Tensor, sigma: float | None, chunk_frames: int,
                        sync=lambda: None) -> tuple[torch.Tensor, float]:
    """``mel [B, n_mels, F]`` pushed ``chunk_frames`` frames at a time through
    ``model.stream(sigma)`` -> ``(audio [B, F * hop], seconds until the first samples came
    out)`` (``sync`` waits for the device before a clock is read)."""
    stream = model.stream(sigma=sigma)
    pieces, first = [], None
    start = time.perf_counter()
    for begin in range(0, mel.shape[-1], chunk_frames):
        piece = stream.push(mel[..., begin:begin + chunk_frames])
        if first is None and piece.shape[-1]:
            sync()
            first = time.perf_counter() - start
        pieces.append(piece.float())
    pieces.append(stream.flush().float())
    if first is None:
        sync()
        first = time.perf_counter() - start
    return torch.cat(pieces, dim=-1), first


def synthesize_long(
    model,
    mel: torch.Tensor,
    sigma: float | None = None,
    chunk_frames: int = 0,
    overlap_frames: int = 16,
) -> torch.Tensor:
    """``mel [B, n_mels, F] -> audio [B, F * hop]``.

    With ``chunk_frames > 0`` and ``F > chunk_frames``, the mel is cut into chunks that overlap
    by ``overlap_frames`` on each side; each chunk is synthesised with that context and the
    overlaps are cross-faded with raised-cosine windows, so memory stays bounded and no seam
    is audible.
    """
    frames = mel.shape[-1]
    if chunk_frames <= 0 or frames <= chunk_frames:
        return model.synthesize(mel, sigma=sigma)
    # A model with an excitation source gets each chunk's piece of the whole utterance's source,
    # so the pulses of overlapping chunks agree where they are cross-faded.
    excitation = getattr(model, "excitation", None)
    pieces = (None if excitation is None else
              SourcePieces(excitation, mel.to(next(excitation.parameters()))))
    hop = model.hop_length
    ov = max(1, min(overlap_frames, chunk_frames // 4))
    out = torch.zeros(mel.shape[0], frames * hop, device=mel.device, dtype=torch.float32)
    fade_len = 2 * ov * hop
    fade_in = _fade(fade_len, mel.device, torch.float32)
    # Equal chunks of at least chunk_frames / 2 >= 2 * ov frames, so fades never overlap.
    n_chunks = math.ceil(frames / chunk_frames)
    bounds = [round(i * frames / n_chunks) for i in range(n_chunks + 1)]
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        lo, hi = max(start - ov, 0), min(end + ov, frames)
        if pieces is None:
            piece = model.synthesize(mel[..., lo:hi], sigma=sigma).float()
        else:
            with torch.no_grad():
                source = pieces(lo, hi)
            piece = model.synthesize(mel[..., lo:hi], sigma=sigma, source=source).float()
        # The piece covers [lo, hi); its overlaps with the neighbours are cross-faded.
        weight = torch.ones(piece.shape[-1], device=mel.device)
        if lo < start:
            weight[:fade_len] = fade_in
        if hi > end:
            weight[-fade_len:] = 1.0 - fade_in
        out[:, lo * hop : hi * hop] += piece * weight
    return out


def batches_by_length(items: list, batch_size: int, length=lambda x: x.mel.shape[-1]):
    """Groups of up to ``batch_size`` items of similar length (longest first)."""
    order = sorted(items, key=length, reverse=True)
    return [order[i : i + batch_size] for i in range(0, len(order), max(batch_size, 1))]


def pad_mels(mels: list[np.ndarray], fill: float) -> torch.Tensor:
    """Stack ``[n_mels, F_i]`` mels into ``[B, n_mels, max F]``, padding with ``fill``."""
    longest = max(m.shape[-1] for m in mels)
    out = np.full((len(mels), mels[0].shape[0], longest), fill, dtype=np.float32)
    for i, m in enumerate(mels):
        out[i, :, : m.shape[-1]] = m
    return torch.from_numpy(out)
