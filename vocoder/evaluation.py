"""Copy-synthesis evaluation: recordings through a model's own front end and back, scored
against the recordings (:mod:`vocoder.metrics`); the library behind ``vocoder-eval``.

:func:`evaluate` writes::

    DIR/metrics.json   checkpoint, kind, per-file rows, means, definitions
    DIR/metrics.md     the same as a table
    DIR/wavs/<name>.wav  the synthesised audio, as long as its reference
    DIR/report.html    with report=True (audio players and mel pictures)

An unreadable file (or a missing synthesised one) is one ``warning:`` line on stderr and is
skipped; when none can be read it raises :class:`~vocoder.errors.VocoderError`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vocoder.errors import InputError, VocoderError

# Metrics printed per file and in the summary line.
HEADLINE = ("log_mel_l1", "mr_stft", "mcd_db", "f0_rmse_cents", "gross_pitch_error",
            "f0_rmse_fine_cents", "voicing_error", "periodicity", "pesq_wb", "stoi", "teacher_nll")
# Per-file keys averaged over files in "mean" (the F0 RMSEs, gross pitch error and voicing
# error are pooled instead).
_AVERAGED = ("log_mel_l1", "mr_stft", "mcd_db", "periodicity", "periodicity_reference",
             "pesq_wb", "stoi", "teacher_nll", "teacher_nll_reference")

DEFINITIONS = {
    "log_mel_l1": "mean |ln mel(ref) - ln mel(syn)| over bands and frames (the checkpoint's "
                  "front end), nepers",
    "mr_stft": "mean over STFT resolutions (512,128,512), (1024,256,1024), (2048,512,2048) of "
               "||S_r - S_s||_F / ||S_r||_F + mean |ln S_r - ln S_s|",
    "mcd_db": "10/ln10 * sqrt(2 * sum_{d=1}^{n_mfcc-1} (c_d - c'_d)^2) averaged over frames; "
              "c = DCT-II / n_mels of the natural-log mel power (2 ln mel), c0 excluded",
    "f0_rmse_cents": "RMS of 1200 log2(f0_syn / f0_ref) over frames voiced in both; mean pools "
                     "all such frames of all files",
    "gross_pitch_error": "fraction of the frames voiced in both whose F0 is off by more than "
                         "20% (about 316 cents); mean pools all such frames of all files",
    "f0_rmse_fine_cents": "F0 RMSE over the frames voiced in both that are not gross pitch "
                          "errors (within 20%); mean pools all such frames of all files",
    "voicing_error": "fraction of frames whose voiced/unvoiced decision differs; mean pools "
                     "all frames",
    "periodicity": "normalised autocorrelation of the synthesis at the reference's pitch "
                   "period (best lag within a sample), averaged over frames the reference F0 "
                   "calls voiced (1024-sample windows); 1 periodic, ~0 noise; "
                   "periodicity_reference is the same of the reference",
    "pesq_wb": "wide-band PESQ (P.862.2) at 16 kHz, MOS-LQO 1.0-4.6, higher is better (needs "
               "the pesq package: pip install flow-vocoder[eval])",
    "stoi": "short-time objective intelligibility, 0-1, higher is better (needs pystoi)",
    "teacher_nll": "-log p_teacher(syn | mel of ref) / samples, nats per sample",
}


def _input_files(source: Path, max_files: int | None) -> list[tuple[str, Path]]:
    """``(name, path)`` pairs; names are unique, flat file stems (``sub__stem`` for files in
    subfolders)."""
    from vocoder.audio import list_audio_files

    if source.is_file():
        paths, root = [source], source.parent
    elif source.is_dir():
        paths, root = list_audio_files(source), source
    else:
        raise VocoderError(f"{source}: input not found")
    if not paths:
        raise VocoderError(f"{source}: no .wav or .flac files")
    if max_files is not None:
        paths = paths[: max(0, int(max_files))]
    named, used = [], set()
    for path in paths:
        name = "__".join(path.relative_to(root).with_suffix("").parts)
        if name in used:
            name = f"{name}_{path.suffix.lstrip('.').lower()}"
        used.add(name)
        named.append((name, path))
    return named


def _true_f0(f0_dir: Path | None, stem: str, n_frames: int) -> np.ndarray | None:
    if f0_dir is None:
        return None
    path = f0_dir / f"{stem}.npy"
    if not path.is_file():
        return None
    f0 = np.load(path)
    if f0.ndim != 1 or f0.shape[0] != n_frames:
        print(f"warning: {path}: F0 contour has shape {list(f0.shape)}, expected "
              f"[{n_frames}]; estimating F0 with pyin instead", file=sys.stderr)
        return None
    return f0


@torch.no_grad()
def _teacher_nll(teacher, reference: np.ndarray, synthesis: np.ndarray) -> dict:
    """NLL in nats per sample of the synthesis and of the reference under the teacher, both
    conditioned on the reference's mel, cropped to a whole number of frames."""
    hop = teacher.hop_length
    frames = min(reference.shape[0], synthesis.shape[0]) // hop
    if frames == 0:
        return {}
    device = teacher.features.mel_basis.device
    ref = torch.from_numpy(reference).to(device)
    mel = teacher.features(ref)[:, :frames].unsqueeze(0)
    n = frames * hop
    batch = torch.stack([torch.from_numpy(synthesis[:n]).to(device), ref[:n]])
    nll = -teacher.log_prob(batch, mel.expand(2, -1, -1)) / n
    return {"teacher_nll": float(nll[0]), "teacher_nll_reference": float(nll[1])}


def _synthesize(model, features, audio: np.ndarray, device: torch.device,
                sigma: float | None, seed: int) -> tuple[np.ndarray, float]:
    """Copy-synthesis of one recording: ``(audio as long as the recording, seconds taken)``."""
    torch.manual_seed(seed)  # each file's noise independent of the others
    mel = features(torch.from_numpy(audio).to(device)).unsqueeze(0)
    start = time.perf_counter()
    with torch.no_grad():
        synthesis = model.synthesize(mel, sigma=sigma)[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return synthesis[: audio.shape[0]].float().cpu().numpy(), seconds


def _given_synthesis(path: Path, features, length: int) -> np.ndarray:
    """An already synthesised file for a recording of ``length`` samples, cut to that length;
    :class:`~vocoder.errors.InputError` when it is missing, at another rate or much shorter."""
    import soundfile as sf

    from vocoder.audio import load_audio

    if not path.is_file():
        raise InputError(path, "no synthesised file of this name")
    synthesis = load_audio(path, features.sample_rate)  # InputError for undecodable files
    rate = sf.info(str(path)).samplerate
    if rate != features.sample_rate:
        raise InputError(path, f"sampled at {rate} Hz, the checkpoint at "
                               f"{features.sample_rate} Hz")
    # vocoder-synth writes whole mel frames: up to one hop shorter than the recording.
    if synthesis.shape[0] + features.hop_length < length:
        raise InputError(path, f"{synthesis.shape[0]} samples, the recording has {length}")
    return np.pad(synthesis, (0, max(0, length - synthesis.shape[0])))[:length]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def summarise(rows: list[dict]) -> dict:
    """Means over files: plain means of the per-file distances, the F0 RMSEs and gross pitch
    error pooled over all frames voiced in both, voicing error pooled over all frames, and
    synthesis speed."""
    mean: dict = {"files": len(rows), "seconds": sum(r["seconds"] for r in rows)}
    for key in _AVERAGED:
        values = [r[key] for r in rows if _finite(r.get(key))]
        if values:
            mean[key] = float(np.mean(values))
    voiced = sum(r["voiced_both"] for r in rows if _finite(r["f0_rmse_cents"]))
    squared = sum(r["f0_rmse_cents"] ** 2 * r["voiced_both"] for r in rows
                  if _finite(r["f0_rmse_cents"]))
    mean["f0_rmse_cents"] = math.sqrt(squared / voiced) if voiced else None
    gross = sum(r["gross_errors"] for r in rows if _finite(r["f0_rmse_cents"]))
    mean["gross_pitch_error"] = gross / voiced if voiced else None
    fine = [(r["f0_rmse_fine_cents"], r["voiced_both"] - r["gross_errors"]) for r in rows
            if _finite(r.get("f0_rmse_fine_cents"))]
    fine_frames = sum(n for _, n in fine)
    mean["f0_rmse_fine_cents"] = (math.sqrt(sum(v ** 2 * n for v, n in fine) / fine_frames)
                                  if fine_frames else None)
    frames = sum(r["frames"] for r in rows)
    mean["voicing_error"] = (sum(r["voicing_error"] * r["frames"] for r in rows) / frames
                             if frames else None)
    mean["voiced_both"] = voiced
    mean["frames"] = frames
    timed = [r for r in rows if _finite(r.get("synthesis_seconds"))]
    synth_time = sum(r["synthesis_seconds"] for r in timed) if timed else None
    mean["synthesis_seconds"] = synth_time
    # Real-time factor as everywhere in the toolkit: synthesis time / audio duration.
    timed_audio = sum(r["seconds"] for r in timed)
    mean["real_time_factor"] = synth_time / timed_audio if timed and timed_audio > 0 else None
    return mean


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def markdown(result: dict) -> str:
    from vocoder.report import METRIC_COLUMNS, format_metric

    shown = [(k, h) for k, h in METRIC_COLUMNS if any(k in r for r in result["files"])]
    lines = [f"# Copy-synthesis: {result['kind']} `{result['checkpoint']}`", "",
             f"device {result['device']}, "
             f"sigma {'model default' if result['sigma'] is None else result['sigma']}, "
             f"{result['mean']['files']} files, {result['mean']['seconds']:.2f} s of audio, "
             + (f"synthesis read from `{result['synthesis']}`. " if result.get("synthesis")
                else f"synthesis real-time factor "
                     f"{format_metric(result['mean']['real_time_factor'])}. ")
             + "Lower is better for every metric.", ""]
    header = ["file", "seconds"] + [h for _, h in shown] + ["F0 reference"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in result["files"]:
        cells = [row["name"], f"{row['seconds']:.2f}"]
        cells += [format_metric(row.get(k)) for k, _ in shown] + [row["f0_source"]]
        lines.append("| " + " | ".join(cells) + " |")
    mean = result["mean"]
    cells = ["**mean**", f"{mean['seconds']:.2f}"]
    cells += [format_metric(mean.get(k)) for k, _ in shown] + [""]
    lines.append("| " + " | ".join(cells) + " |")
    if result["skipped"]:
        lines += ["", "Skipped:"] + [f"- {s['file']}: {s['problem']}" for s in result["skipped"]]
    lines += ["", "Definitions:"] + [f"- `{k}`: {v}" for k, v in result["definitions"].items()]
    return "\n".join(lines) + "\n"


def evaluate(checkpoint: str | Path, input: str | Path, output: str | Path, *,
             synthesis: str | Path | None = None, device: str = "cpu",
             sigma: float | None = None, max_files: int | None = None,
             f0_dir: str | Path | None = None, teacher: str | Path | None = None,
             report: bool = False, seed: int = 1234, n_mfcc: int = 24,
             f0_fmin: float = 50.0, f0_fmax: float = 500.0) -> dict:
    """Copy-synthesis quality of ``checkpoint`` on the recordings in ``input`` (a file or a
    folder), or of the files already in ``synthesis``; writes ``output/metrics.json``,
    ``metrics.md``, ``wavs/`` and with ``report`` an HTML report, and returns the result
    (per-file rows, means, definitions). Options as in :mod:`vocoder.cli.eval`."""
    from vocoder.atomic import write_text_atomic
    from vocoder.audio import load_audio, write_wav
    from vocoder.devices import resolve_device
    from vocoder.losses import MultiResolutionSTFTLoss
    from vocoder.metrics import copy_synthesis_metrics
    from vocoder.models import load_model
    from vocoder.report import format_metric, write_html_report

    device = resolve_device(str(device))
    output = Path(str(output))
    sigma = None if sigma is None else float(sigma)
    f0_dir = None if f0_dir is None else Path(str(f0_dir))
    if f0_dir is not None and not f0_dir.is_dir():
        raise VocoderError(f"f0_dir={f0_dir}: not a folder")
    given = None if synthesis is None else Path(str(synthesis))
    if given is not None and not given.is_dir():
        raise VocoderError(f"synthesis={given}: not a folder")
    files = _input_files(Path(str(input)), max_files)

    model = load_model(str(checkpoint), device=device)
    features = model.features
    teacher_path, teacher = teacher, None
    if teacher_path is not None:
        teacher = load_model(str(teacher_path), device=device)
        if teacher.kind != "teacher":
            raise VocoderError(f"{teacher_path}: holds a {teacher.kind} model, not a teacher")
        if teacher.features.sample_rate != features.sample_rate:
            raise VocoderError(f"{teacher_path}: teacher runs at "
                               f"{teacher.features.sample_rate} Hz, the checkpoint at "
                               f"{features.sample_rate} Hz")
    f0_range = (float(f0_fmin), float(f0_fmax))
    shortest = max(features.min_samples(), MultiResolutionSTFTLoss().min_samples())

    rows, skipped = [], []
    for name, path in files:
        try:
            audio = load_audio(path, features.sample_rate)
            if audio.shape[0] < shortest:
                raise InputError(path, f"too short ({audio.shape[0]} samples, "
                                       f"need at least {shortest})")
        except InputError as e:
            print(f"warning: {e}", file=sys.stderr)
            skipped.append({"file": str(path), "problem": e.problem})
            continue
        if given is None:
            synthesis, synth_seconds = _synthesize(model, features, audio, device, sigma,
                                                   int(seed))
        else:
            try:
                synthesis = _given_synthesis(given / f"{name}.wav", features, audio.shape[0])
            except InputError as e:
                print(f"warning: {e}", file=sys.stderr)
                skipped.append({"file": str(e.path), "problem": e.problem})
                continue
            synth_seconds = None
        bad = int((~np.isfinite(synthesis)).sum())
        if bad:
            print(f"warning: {path}: synthesis has {bad} NaN/Inf samples (set to 0/±1)",
                  file=sys.stderr)
            synthesis = np.nan_to_num(synthesis, nan=0.0, posinf=1.0, neginf=-1.0)
        write_wav(output / "wavs" / f"{name}.wav", synthesis, features.sample_rate)
        ref_f0 = _true_f0(f0_dir, path.stem, audio.shape[0] // features.hop_length + 1)
        start = time.perf_counter()
        row = {"name": name, "file": str(path), "seconds": audio.shape[0] / features.sample_rate,
               "synthesis_seconds": synth_seconds}
        row.update(copy_synthesis_metrics(audio, synthesis, features, ref_f0, f0_range,
                                          int(n_mfcc)))
        if teacher is not None:
            row.update(_teacher_nll(teacher, audio, synthesis))
        row["metrics_seconds"] = time.perf_counter() - start
        if bad:
            row["nonfinite_samples"] = bad
        rows.append(row)
        print(f"{name}: " + ", ".join(
            f"{k}={format_metric(row[k])}" for k in HEADLINE if k in row))
    if not rows:
        raise VocoderError(f"{input}: none of the {len(files)} audio file(s) could be read")

    result = {
        "checkpoint": str(checkpoint),
        "synthesis": None if given is None else str(given),
        "kind": model.kind,
        "teacher": None if teacher is None else str(teacher_path),
        "device": str(device),
        "sigma": sigma,
        "features": features.config.to_dict(),
        "mcd_includes_c0": False,
        "mcd_n_mfcc": int(n_mfcc),
        "f0_range_hz": list(f0_range),
        "files": rows,
        "skipped": skipped,
        "mean": summarise(rows),
        "definitions": DEFINITIONS,
    }
    result = _json_safe(result)
    write_text_atomic(output / "metrics.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(output / "metrics.md", markdown(result))
    if report:
        write_html_report(output, rows, {model.kind: output / "wavs"}, reference_dir=None,
                          metrics={model.kind: result}, features=features,
                          title=f"Copy-synthesis: {model.kind} ({checkpoint})")
    return result
