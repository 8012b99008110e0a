"""A listening report: one HTML page comparing vocoders on the same utterances.

For every utterance the page shows the reference recording and each model's copy-synthesis
side by side, each with an audio player and a mel picture (same colour scale within a
row), under it each model's metrics, and at the top a table of mean metrics per model and
the benchmark chart when there is one. Audio is linked by relative path and pictures are
PNG files next to the page, so the folder can be moved or served as a whole.
"""

from __future__ import annotations

import html
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch

from vocoder.atomic import write_text_atomic
from vocoder.audio import AUDIO_EXTENSIONS, load_audio
from vocoder.errors import VocoderError
from vocoder.features import MelFrontEnd

# (key in a metrics row, column heading); only keys some model reports are shown.
METRIC_COLUMNS = (
    ("log_mel_l1", "log-mel L1"),
    ("mr_stft", "MR-STFT"),
    ("mcd_db", "MCD (dB)"),
    ("f0_rmse_cents", "F0 RMSE (cents)"),
    ("gross_pitch_error", "gross pitch error"),
    ("f0_rmse_fine_cents", "F0 RMSE without gross errors (cents)"),
    ("voicing_error", "voicing error"),
    ("periodicity", "periodicity (higher is better)"),
    ("pesq_wb", "PESQ wide-band (higher)"),
    ("stoi", "STOI (higher)"),
    ("teacher_nll", "teacher NLL (nats/sample)"),
)

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: center; vertical-align: top; }
th { background: #f3f3f3; }
td.num { font-family: monospace; }
audio { width: 260px; }
img.mel { width: 260px; display: block; }
.missing { color: #a00; }
"""


def format_metric(value) -> str:
    """A metric for a table cell: 4 significant digits, ``-`` for missing or NaN."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _find_audio(folder: Path | None, name: str) -> Path | None:
    if folder is None:
        return None
    for ext in AUDIO_EXTENSIONS:
        candidate = folder / f"{name}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _link(path: Path, output_dir: Path) -> str:
    return quote(Path(os.path.relpath(path.resolve(), output_dir.resolve())).as_posix())


def _draw_mel(mel: np.ndarray, path: Path, vmin: float, vmax: float, hop_seconds: float,
              fmax: float) -> None:
    from matplotlib.figure import Figure  # Figure alone renders with Agg; no pyplot state

    fig = Figure(figsize=(4.0, 2.0), dpi=80)
    ax = fig.add_axes((0.13, 0.2, 0.85, 0.75))
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
              interpolation="nearest",
              extent=(0.0, mel.shape[1] * hop_seconds, 0, mel.shape[0]))
    ax.set_xlabel("s", fontsize=7)
    ax.set_ylabel(f"mel band (0-{fmax / 1000:g} kHz)", fontsize=6)
    ax.tick_params(labelsize=6)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def _row_name(row) -> str:
    return str(row["name"]) if isinstance(row, Mapping) else str(row)


def _metrics_by_name(model_metrics: Mapping | None) -> dict[str, Mapping]:
    if not model_metrics:
        return {}
    return {str(r["name"]): r for r in model_metrics.get("files", [])}


def write_html_report(output_dir: str | os.PathLike, rows: Sequence[str | Mapping] | None,
                      models: Mapping[str, str | os.PathLike],
                      reference_dir: str | os.PathLike | None,
                      bench_png: str | os.PathLike | None = None,
                      metrics: Mapping[str, Mapping] | None = None,
                      features: MelFrontEnd | None = None,
                      title: str = "Copy-synthesis report",
                      bench: Mapping | None = None) -> Path:
    """Write ``output_dir/report.html`` (and its pictures under ``output_dir/mels/``).

    * ``rows``: the utterances to show, in order: names (file stems) or per-file metric rows
      (dicts with ``name``, and optionally ``file``, the reference's path). ``None`` means
      every audio file in ``reference_dir``.
    * ``models``: display name -> folder holding ``<name>.wav`` for each utterance, any number
      of models (e.g. ``{"teacher": ..., "student": ..., "waveglow": ...}`` or just one).
    * ``reference_dir``: folder of the reference recordings (``<name>.wav`` or ``.flac``);
      ``None`` leaves the reference column out unless rows carry ``file``.
    * ``bench_png``: a benchmark chart, copied next to the page and shown at the top.
    * ``metrics``: display name -> that model's ``metrics.json`` content (``files`` rows keyed
      by ``name`` and ``mean``); models without an entry show no numbers.
    * ``features``: the front end for the pictures (default: ``tacotron2`` preset).
    * ``bench``: the content of a ``bench.json`` from ``vocoder-bench``, shown as the speed
      table (samples per second, real-time factor, MACs per sample, share of the binding
      floor: the lower of the device's matmul and bandwidth floors) and the student's speed
      ratios, above the chart.

    Missing or unreadable audio shows as such in its cell; it never stops the report.
    Returns the page's path.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    features = features or MelFrontEnd.from_preset("tacotron2")
    reference_dir = Path(reference_dir) if reference_dir is not None else None
    if rows is None:
        if reference_dir is None:
            raise VocoderError("write_html_report needs rows or a reference_dir to list")
        rows = sorted({p.stem for ext in AUDIO_EXTENSIONS for p in reference_dir.glob(f"*{ext}")})
    metrics = dict(metrics or {})
    per_model_rows = {name: _metrics_by_name(metrics.get(name)) for name in models}
    shown = [key for key, _ in METRIC_COLUMNS
             if any(key in r for rows_of in per_model_rows.values() for r in rows_of.values())]
    headings = dict(METRIC_COLUMNS)

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts.append(_summary_table(models, metrics, shown, headings))
    has_chart = bench_png is not None and Path(bench_png).is_file()
    if bench or has_chart:
        parts.append("<h2>Speed</h2>")
    if bench:
        parts.append(_speed_table(bench))
    if has_chart:
        target = output_dir / "bench.png"
        if Path(bench_png).resolve() != target.resolve():
            shutil.copyfile(bench_png, target)
        parts.append("<img src='bench.png' alt='benchmark chart' style='max-width: 900px'>")
    parts.append("<h2>Utterances</h2>")
    for row in rows:
        name = _row_name(row)
        reference = None
        if isinstance(row, Mapping) and row.get("file") and Path(row["file"]).is_file():
            reference = Path(row["file"])
        reference = reference or _find_audio(reference_dir, name)
        columns = ([("reference", reference)] if reference is not None else [])
        columns += [(model, _find_audio(Path(folder), name)) for model, folder in models.items()]
        parts.append(_utterance_table(name, columns, output_dir, features, per_model_rows,
                                      shown, headings))
    parts.append("</body></html>")
    page = output_dir / "report.html"
    write_text_atomic(page, "\n".join(parts))
    return page


def _speed_table(bench: Mapping) -> str:
    """``bench.json`` rows as a table, then its ratios and where it was measured."""

    def number(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    head = ("<tr><th>model</th><th>device</th><th>dtype</th><th>batch</th><th>samples/s</th>"
            "<th>real-time factor</th><th>MACs/sample</th><th>of the floor</th></tr>")
    body = []
    for row in bench.get("rows", []):
        floor = row.get("fraction_of_floor")
        body.append(
            f"<tr><th>{html.escape(str(row.get('model')))}</th>"
            f"<td>{html.escape(str(row.get('device')))}</td>"
            f"<td>{html.escape(str(row.get('dtype')))}</td>"
            f"<td class='num'>{row.get('batch')}</td>"
            f"<td class='num'>{number(row.get('samples_per_s'), ',.0f')}</td>"
            f"<td class='num'>{number(row.get('real_time_factor'), '.4f')}</td>"
            f"<td class='num'>{number(row.get('macs_per_sample'), ',.0f')}</td>"
            f"<td class='num'>{'-' if floor is None else f'{100 * floor:.0f}%'}</td></tr>")
    ratios = "".join(f"<li>{html.escape(key.replace('_', ' '))}: {value:.1f}x</li>"
                     for key, value in bench.get("ratios", {}).items() if value is not None)
    env = bench.get("environment", {})
    machine = ", ".join(f"{label}{env[k]}" for k, label in
                        (("gpu", ""), ("cpu", ""), ("threads", "threads: "), ("torch", "torch "))
                        if env.get(k))
    note = ("<p>The floor is the lower of two: the model's MACs at the device's measured "
            "matmul rate, and the bytes its eager operators read and write at the measured "
            "copy rate. The second assumes every intermediate goes through memory, so small "
            "inputs whose activations stay in cache can run above it (over 100%).</p>")
    return (f"<table>{head}{''.join(body)}</table><ul>{ratios}</ul>{note}"
            + (f"<p>Measured on {html.escape(machine)}.</p>" if machine else ""))


def _summary_table(models, metrics, shown, headings) -> str:
    if not shown:
        return ""
    head = "".join(f"<th>{html.escape(headings[k])}</th>" for k in shown)
    body = []
    for model in models:
        mean = (metrics.get(model) or {}).get("mean", {})
        cells = "".join(f"<td class='num'>{format_metric(mean.get(k))}</td>" for k in shown)
        body.append(f"<tr><th>{html.escape(model)}</th>{cells}</tr>")
    return (f"<h2>Mean metrics (lower is better)</h2><table><tr><th>model</th>{head}</tr>"
            f"{''.join(body)}</table>")


@torch.no_grad()
def _utterance_table(name, columns, output_dir, features, per_model_rows, shown,
                     headings) -> str:
    mels: dict[str, np.ndarray | str] = {}
    for label, path in columns:
        if path is None:
            mels[label] = "missing"
            continue
        try:
            audio = load_audio(path, features.sample_rate, log=None)
            if audio.shape[0] < features.min_samples():
                raise ValueError("too short for a mel picture")
            mels[label] = features(torch.from_numpy(audio).to(features.mel_basis)).cpu().numpy()
        except (VocoderError, ValueError) as e:
            mels[label] = f"unreadable ({e})"
    arrays = [m for m in mels.values() if isinstance(m, np.ndarray)]
    vmin = features.silence_level()
    vmax = max((float(m.max()) for m in arrays), default=0.0)
    vmax = vmax if vmax > vmin else vmin + 1.0
    hop_seconds = features.hop_length / features.sample_rate
    players, pictures = [], []
    for label, path in columns:
        mel = mels[label]
        if isinstance(mel, str):
            players.append(f"<td class='missing'>{html.escape(mel)}</td>")
            pictures.append("<td></td>")
            continue
        image = output_dir / "mels" / label / f"{name}.png"
        _draw_mel(mel, image, vmin, vmax, hop_seconds, features.config.fmax)
        players.append(f"<td><audio controls preload='none' src='{_link(path, output_dir)}'>"
                       f"</audio></td>")
        pictures.append(f"<td><img class='mel' src='{_link(image, output_dir)}' "
                        f"alt='{html.escape(label)} mel'></td>")
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in columns)
    numbers = []
    for label, _ in columns:
        row = per_model_rows.get(label, {}).get(name)
        if row is None or not shown:
            numbers.append("<td></td>")
            continue
        lines = "<br>".join(f"{html.escape(headings[k])}: {format_metric(row.get(k))}"
                            for k in shown if k in row)
        numbers.append(f"<td class='num'>{lines}</td>")
    metric_row = f"<tr>{''.join(numbers)}</tr>" if shown else ""
    return (f"<h3>{html.escape(name)}</h3><table><tr>{head}</tr><tr>{''.join(players)}</tr>"
            f"<tr>{''.join(pictures)}</tr>{metric_row}</table>")
