"""``vocoder-synth checkpoint=CKPT input=FILE_OR_DIR output=DIR [sigma=S] [device=cpu|cuda]
[backend=torch|onnxruntime] [stream=true chunk_frames=N]``.

``backend=onnxruntime`` runs an exported graph (``checkpoint=FILE.onnx``) or exports the
checkpoint first. ``stream=true`` pushes ``chunk_frames`` mel frames at a time through
``model.stream()`` (student and teacher: exact; WaveGlow: chunked with context) and reports when
the first audio came out.

One 16-bit wav per input (same stem), ``frames * hop`` samples long. Inputs that cannot be
used are named on one line each and skipped; the exit code is non-zero when any failed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vocoder.cli.common import hydra_app
from vocoder.errors import InputError, VocoderError


def _onnx_model(cfg):
    """The graph to run: ``checkpoint`` itself when it is an ``.onnx`` file, else the
    checkpoint exported now (at ``sigma``) into a temporary folder."""
    import tempfile

    from vocoder.export import OnnxVocoder, export_onnx
    from vocoder.models import load_model

    if str(cfg.checkpoint).endswith(".onnx"):
        return OnnxVocoder(cfg.checkpoint)
    model = load_model(cfg.checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, Path(folder) / "model.onnx", sigma=cfg.sigma)
        graph = OnnxVocoder(path)
    return graph


@hydra_app("synth")
def main(cfg) -> None:
    import torch

    from vocoder.audio import write_wav
    from vocoder.devices import DTYPES, resolve_device, set_tf32, sync
    from vocoder.models import load_model
    from vocoder.synthesis import (
        batches_by_length,
        list_inputs,
        pad_mels,
        read_input,
        synthesize_long,
        synthesize_streamed,
    )

    if str(cfg.dtype) not in DTYPES:
        raise VocoderError(f"unknown dtype {cfg.dtype!r} (fp32, fp16, bf16)")
    device = resolve_device(str(cfg.device))
    backend = str(cfg.backend)
    if backend not in ("torch", "onnxruntime"):
        raise VocoderError(f"unknown backend {backend!r} (torch, onnxruntime)")
    stream = bool(cfg.stream)
    if int(cfg.chunk_frames) < (1 if stream else 0):
        raise VocoderError(f"chunk_frames must be positive with stream=true, got "
                           f"{cfg.chunk_frames}")
    files = list_inputs(cfg.input)
    dtype = DTYPES[str(cfg.dtype)]
    if backend == "onnxruntime":
        if device.type != "cpu" or str(cfg.dtype) != "fp32" or stream:
            raise VocoderError("backend=onnxruntime runs fp32 on the CPU, without streaming "
                               "(device=cpu dtype=fp32 stream=false)")
        model = _onnx_model(cfg)
    else:
        model = load_model(cfg.checkpoint, device=device)
        set_tf32(str(cfg.dtype) == "tf32")
        model = model.to(dtype)
    features = model.features
    if features is None:
        raise VocoderError(f"{cfg.checkpoint}: the graph records no mel front end")
    if stream and not hasattr(model, "stream"):
        raise VocoderError(f"a {model.kind} cannot stream")
    denoiser = None
    if float(cfg.denoise) > 0:
        if model.kind != "waveglow" or backend != "torch":
            raise VocoderError(f"denoise applies to WaveGlow checkpoints only, not a {model.kind}")
        from vocoder.denoiser import Denoiser

        denoiser = Denoiser(model, silence_level=features.silence_level())
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(cfg.seed))

    inputs, failed = [], 0
    for f in files:
        try:
            inputs.append(read_input(f, features))
        except InputError as e:
            print(f"warning: skipping {e}", file=sys.stderr)
            failed += 1
    stems = [i.path.stem for i in inputs]
    if len(set(stems)) != len(stems):
        raise VocoderError(f"{cfg.input}: several inputs share a file stem; outputs would clash")
    if not inputs:
        raise VocoderError(f"{cfg.input}: no usable input ({failed} skipped)")

    progress = None
    if cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=len(inputs), desc=f"synth {model.kind}", unit="file", leave=False)
    sr, hop = features.sample_rate, features.hop_length
    total_audio = total_time = 0.0
    for batch in batches_by_length(inputs, int(cfg.batch_size)):
        mel = pad_mels([b.mel for b in batch], features.silence_level()).to(device, dtype)
        sync(device)
        t0 = time.perf_counter()
        first = None
        with torch.no_grad():
            if stream:
                audio, first = synthesize_streamed(model, mel, cfg.sigma,
                                                   int(cfg.chunk_frames), lambda: sync(device))
            else:
                audio = synthesize_long(model, mel, sigma=cfg.sigma,
                                        chunk_frames=int(cfg.chunk_frames),
                                        overlap_frames=int(cfg.overlap_frames)).float()
            if denoiser is not None:
                audio = denoiser(audio, strength=float(cfg.denoise))
        sync(device)
        elapsed = time.perf_counter() - t0
        batch_seconds = sum(b.mel.shape[-1] * hop / sr for b in batch)
        total_audio += batch_seconds
        total_time += elapsed
        for i, item in enumerate(batch):
            n = item.mel.shape[-1] * hop
            write_wav(out_dir / f"{item.path.stem}.wav", audio[i, :n].cpu(), sr)
            seconds = n / sr
            share = elapsed * seconds / batch_seconds
            msg = f"{item.path.name}: {seconds:.2f} s of audio, RTF {share / seconds:.4f}"
            if first is not None:
                msg += f", first audio after {first * 1000:.0f} ms"
            (progress.write if progress is not None else print)(msg)
        if progress is not None:
            progress.update(len(batch))
    if progress is not None:
        progress.close()
    print(f"wrote {len(inputs)} file(s) to {out_dir}: {total_audio:.2f} s of audio in "
          f"{total_time:.2f} s, overall RTF {total_time / max(total_audio, 1e-9):.4f} "
          f"({total_audio * sr / max(total_time, 1e-9):,.0f} samples/s)")
    if failed:
        print(f"error: {failed} input(s) could not be used (see warnings above)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
