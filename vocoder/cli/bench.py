"""``vocoder-bench output=DIR device=cpu|cuda [seconds=S] [teacher=CKPT student=CKPT
waveglow=CKPT] [backend=[torch,onnxruntime]] [stream_chunks=[1,4,16]]``.

Writes ``DIR/bench.json``, ``DIR/bench.md`` and ``DIR/bench.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from vocoder.cli.common import hydra_app
from vocoder.errors import VocoderError


def _ratios(rows: list[dict]) -> tuple[dict, dict]:
    """Student over teacher and over WaveGlow at every (dtype, batch, compiled) setting that
    both were timed at (``"student_over_waveglow bf16 batch 8"``), and under the plain key
    (``student_over_waveglow``) the first such setting, usually fp32 at the first batch."""
    first, by_setting = {}, {}
    rows = [r for r in rows if r.get("backend", "torch") == "torch"]
    for a, b in (("student", "teacher"), ("student", "waveglow")):
        for ra in (r for r in rows if r["model"] == a):
            setting = (ra["dtype"], ra["batch"], ra["compiled"])
            rb = [r for r in rows if r["model"] == b
                  and (r["dtype"], r["batch"], r["compiled"]) == setting]
            if not rb:
                continue
            value = ra["samples_per_s"] / rb[0]["samples_per_s"]
            first.setdefault(f"{a}_over_{b}", value)
            compiled = " compiled" if ra["compiled"] else ""
            by_setting[f"{a}_over_{b} {ra['dtype']} batch {ra['batch']}{compiled}"] = value
    return first, by_setting


def _add_floors(row: dict, rates: dict) -> None:
    # The floors: no faster than the device's square-matmul rate allows for the MACs, nor than
    # its copy bandwidth allows for the bytes the eager ops move; the lower binds.
    floors = []
    key = f"matmul_gmacs_{row['dtype']}"
    if key in rates and row["macs_per_sample"] > 0:
        row["matmul_floor_samples_per_s"] = rates[key] * 1e9 / row["macs_per_sample"]
        floors.append(row["matmul_floor_samples_per_s"])
    if rates.get("copy_gbps") and row.get("bytes_per_sample", 0) > 0:
        row["bandwidth_floor_samples_per_s"] = rates["copy_gbps"] * 1e9 / row["bytes_per_sample"]
        floors.append(row["bandwidth_floor_samples_per_s"])
    if floors:
        row["floor_samples_per_s"] = min(floors)
        row["fraction_of_floor"] = row["samples_per_s"] / row["floor_samples_per_s"]


@hydra_app("bench")
def main(cfg) -> None:
    import torch

    from vocoder.bench import (
        bar_chart,
        benchmark_model,
        benchmark_onnx,
        benchmark_stream,
        device_rates,
        environment,
        markdown_table,
        precision_check,
    )
    from vocoder.devices import DTYPES, resolve_device
    from vocoder.features import MelFrontEnd
    from vocoder.models import load_model, model_from_arch

    device = resolve_device(str(cfg.device))
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    for d in cfg.dtypes:
        if str(d) not in DTYPES:
            raise VocoderError(f"unknown dtype {d!r} (fp32, fp16, bf16)")
    backends = [str(cfg.backend)] if isinstance(cfg.backend, str) else [str(b) for b in
                                                                         cfg.backend]
    unknown = sorted(set(backends) - {"torch", "onnxruntime"})
    if unknown:
        raise VocoderError(f"unknown backend {unknown[0]!r} (torch, onnxruntime)")
    if "onnxruntime" in backends and device.type != "cpu":
        raise VocoderError("backend=onnxruntime is timed on the CPU only (device=cpu)")
    stream_chunks = [int(c) for c in cfg.stream_chunks]
    if any(c < 1 for c in stream_chunks):
        raise VocoderError(f"stream_chunks must be positive frame counts, got {stream_chunks}")
    features = MelFrontEnd.from_preset(str(cfg.features.preset))
    out = Path(str(cfg.output))
    out.mkdir(parents=True, exist_ok=True)
    # Rates first and results rewritten after every row, so that a run cut short (a time
    # limit on a lent GPU) still leaves every row it finished.
    rates = device_rates(device)
    env = environment(device)
    env["rates"] = rates
    rows, stream_rows = [], []

    def write() -> None:
        ratios, by_setting = _ratios(rows)
        tmp = out / "bench.json.tmp"
        tmp.write_text(json.dumps({"rows": rows, "ratios": ratios,
                                   "ratios_by_setting": by_setting, "environment": env,
                                   "streaming": stream_rows,
                                   "experiment": str(cfg.experiment)}, indent=1))
        tmp.replace(out / "bench.json")
        shown = by_setting if len(by_setting) > len(ratios) else ratios
        (out / "bench.md").write_text(markdown_table(rows, shown, env, stream_rows))

    for name in cfg.models:
        name = str(name)
        if cfg.get(name):
            model = load_model(cfg[name], device="cpu")
        else:
            model = model_from_arch(name, features.n_mels, features.hop_length,
                                    dict(cfg.arch[name]), features.sample_rate)
            model.features = features
            model.eval().prepare_for_inference()
        sr = model.features.sample_rate
        seconds = float(cfg.teacher_seconds) if name == "teacher" else float(cfg.seconds)
        front_end = model.features
        for dtype in cfg.dtypes:
            # Numerics first, on a copy: the timing below converts the model in place.
            check = (precision_check(model, str(dtype), device, front_end,
                                     float(cfg.check_seconds))
                     if str(dtype) != "fp32" and float(cfg.check_seconds) > 0 else {})
            for batch in (cfg.batches if "torch" in backends else []):
                row = benchmark_model(
                    name,
                    model,
                    device,
                    str(dtype),
                    int(batch),
                    seconds,
                    sr,
                    repeats=int(cfg.repeats),
                    warmup=int(cfg.warmup),
                    compile_model=bool(cfg.compile),
                )
                row["source"] = (
                    str(cfg[name]) if cfg.get(name) else f"random weights, {cfg.experiment} sizes"
                )
                row.update(check)
                _add_floors(row, rates)
                rows.append(row)
                write()
                print(
                    f"{name:9s} {dtype} batch {batch}: {row['samples_per_s']:,.0f} samples/s, "
                    f"RTF {row['real_time_factor']:.4f}, "
                    f"{row['macs_per_sample'] / 1e3:,.1f} kMACs/sample"
                )
        if "onnxruntime" in backends and model.kind != "teacher":
            for batch in cfg.batches:
                row = benchmark_onnx(name, model, int(batch), seconds, sr,
                                     repeats=int(cfg.repeats), warmup=int(cfg.warmup))
                row["source"] = (str(cfg[name]) if cfg.get(name)
                                 else f"random weights, {cfg.experiment} sizes")
                rows.append(row)
                write()
                print(f"{name:9s} onnxruntime fp32 batch {batch}: "
                      f"{row['samples_per_s']:,.0f} samples/s, RTF "
                      f"{row['real_time_factor']:.4f} (exported in {row['export_seconds']:.0f} s)")
        for chunk in stream_chunks:
            srow = benchmark_stream(name, model.float().to(device), chunk, seconds, sr,
                                    repeats=int(cfg.repeats), warmup=int(cfg.warmup))
            stream_rows.append(srow)
            write()
            print(f"{name:9s} streamed in chunks of {chunk} frame(s): first audio after "
                  f"{srow['first_audio_ms']:.1f} ms compute + {srow['algorithmic_latency_ms']:.0f}"
                  f" ms of frames, RTF {srow['real_time_factor']:.4f}")
        del model
    write()
    bar_chart(rows, out / "bench.png")
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")


if __name__ == "__main__":
    main()
