"""Timing synthesis honestly: warm-up, device synchronisation around every repeat, medians;
numerics of low precision against fp32; the device's own rates and description."""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np
import torch

from vocoder.bench.counting import count_bytes_per_sample, count_macs_per_sample
from vocoder.devices import DTYPES, set_tf32
from vocoder.devices import sync as _sync


def time_synthesis(model, mel: torch.Tensor, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` synthesis calls after ``warmup`` untimed ones."""
    device = mel.device
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            model.synthesize(mel)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def benchmark_model(
    name: str,
    model,
    device: torch.device,
    dtype: str,
    batch: int,
    seconds: float,
    sample_rate: int,
    repeats: int = 5,
    warmup: int = 1,
    compile_model: bool = False,
) -> dict:
    """Time one model; returns a row of ``bench.json``."""
    set_tf32(dtype == "tf32")
    hop, n_mels = model.hop_length, model.n_mels
    frames = max(2, int(round(seconds * sample_rate / hop)))
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs_per_sample(model)
    moved = count_bytes_per_sample(model, batch, bytes_per_element=DTYPES[dtype].itemsize)
    mel = _speech_level_mel(n_mels, frames, batch).to(device=device, dtype=DTYPES[dtype])
    runner = model
    if compile_model:
        # The first compiled call compiles and is not timed; the compiled paths read none of
        # the lazily built eager caches, so the second call runs what was compiled.
        runner = _Compiled(model)
        warmup = max(warmup, 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = time_synthesis(runner, mel, repeats=repeats, warmup=warmup)
    median = statistics.median(times)
    samples = batch * frames * hop
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()
    return {
        "model": name,
        "kind": model.kind,
        "device": str(device),
        "dtype": dtype,
        "batch": batch,
        "audio_seconds": frames * hop / sample_rate,
        "samples_per_s": samples / median,
        "real_time_factor": median / (frames * hop / sample_rate),
        "median_s": median,
        "times_s": times,
        "peak_memory_mb": peak / 2**20,
        "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "process_max_rss",
        "parameters": params,
        "macs_per_sample": macs,
        "bytes_per_sample": moved,
        "compiled": compile_model,
        "warmup_calls": warmup,
        "backend": "torch",
    }


def precision_check(model, dtype: str, device: torch.device, features, seconds: float = 1.0,
                    seed: int = 0) -> dict:
    """How far synthesis in ``dtype`` lands from fp32 on the same mel and the same noise.

    Both copies of ``model`` get one random speech-level mel of ``seconds`` and one draw of
    ``z``; returns ``rel_audio_error_vs_fp32`` (``||x_d - x_32|| / ||x_32||``) and
    ``log_mel_l1_vs_fp32`` (mean ``|ln mel(x_d) - ln mel(x_32)|`` with ``features``). For the
    autoregressive teacher any rounding difference changes every later sample, so only its
    mel distance is meaningful. ``model`` itself is left as it was.
    """
    import copy

    from vocoder.metrics import log_mel_distance

    hop = model.hop_length
    frames = max(2, int(round(seconds * features.sample_rate / hop)))
    gen = torch.Generator().manual_seed(seed)
    mel = torch.rand(1, model.n_mels, frames, generator=gen) * 8.0 - 8.0
    z = torch.randn(1, frames * hop, generator=gen)
    outputs = {}
    for name in ("fp32", dtype):
        set_tf32(name == "tf32")
        work = copy.deepcopy(model).to(device=device, dtype=DTYPES[name]).eval()
        with torch.no_grad():
            outputs[name] = work.synthesize(mel.to(device, DTYPES[name]),
                                            z=z.to(device, DTYPES[name]))[0].float().cpu()
        del work
    set_tf32(False)
    ref, low = outputs["fp32"], outputs[dtype]
    return {
        "rel_audio_error_vs_fp32": float((low - ref).norm() / ref.norm().clamp_min(1e-12)),
        "log_mel_l1_vs_fp32": float(log_mel_distance(ref.numpy(), low.numpy(), features)),
    }


class _Compiled:
    def __init__(self, model):
        self.synthesize = torch.compile(model.synthesize)


def _peak_rss_bytes() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def device_rates(device: torch.device, repeats: int = 5) -> dict:
    """Measured peak-ish rates that bound synthesis: square matmul throughput (GMAC/s) per
    dtype and device-memory copy bandwidth (GB/s, read + write)."""
    n = 4096 if device.type == "cuda" else 2048
    dtypes = {"fp32": torch.float32}
    if device.type == "cuda":
        dtypes.update(tf32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)
    rates = {}
    for name, dt in dtypes.items():
        set_tf32(name == "tf32")
        a = torch.randn(n, n, device=device, dtype=dt)
        b = torch.randn(n, n, device=device, dtype=dt)
        out = torch.empty(n, n, device=device, dtype=dt)
        times = []
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            _sync(device)
            if i:
                times.append(time.perf_counter() - t0)
        rates[f"matmul_gmacs_{name}"] = n**3 / statistics.median(times) / 1e9
    set_tf32(False)
    x = torch.empty(64 * 2**20 // 4 if device.type == "cpu" else 256 * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    x.fill_(1.0)
    y.fill_(0.0)
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        _sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    rates["copy_gbps"] = 2 * x.numel() * 4 / statistics.median(times) / 1e9
    return rates


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "platform": platform.platform(),
    }
    try:
        import os

        env["cpu_count"] = os.cpu_count()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    env["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _speech_level_mel(n_mels: int, frames: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A random mel at speech-like log-mel levels (speed does not depend on the values)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(-8.0, 0.0, (batch, n_mels, frames)).astype(np.float32))


def benchmark_onnx(name: str, model, batch: int, seconds: float, sample_rate: int,
                   repeats: int = 5, warmup: int = 1, optimization: str = "all") -> dict:
    """Export ``model`` (student or WaveGlow, fp32) and time the graph in onnxruntime on the
    CPU with as many threads as torch uses, on the mel :func:`benchmark_model` times; returns
    a row of ``bench.json`` with ``backend`` ``onnxruntime``."""
    import tempfile
    from pathlib import Path

    from vocoder.export import OnnxVocoder, export_onnx

    hop = model.hop_length
    frames = max(2, int(round(seconds * sample_rate / hop)))
    model = model.float().cpu().eval()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        path = export_onnx(model, Path(folder) / "model.onnx")
        export_seconds = time.perf_counter() - start
        graph = OnnxVocoder(path, threads=torch.get_num_threads(), optimization=optimization)
        mel = _speech_level_mel(model.n_mels, frames, batch)
        times = time_synthesis(graph, mel, repeats=repeats, warmup=warmup)
    median = statistics.median(times)
    return {
        "model": name, "kind": model.kind, "backend": "onnxruntime", "device": "cpu",
        "dtype": "fp32", "batch": batch, "audio_seconds": frames * hop / sample_rate,
        "samples_per_s": batch * frames * hop / median,
        "real_time_factor": median / (frames * hop / sample_rate), "median_s": median,
        "times_s": times, "peak_memory_mb": _peak_rss_bytes() / 2**20,
        "peak_memory_kind": "process_max_rss",
        "parameters": sum(p.numel() for p in model.parameters()),
        "macs_per_sample": count_macs_per_sample(model), "bytes_per_sample": 0.0,
        "compiled": False, "warmup_calls": warmup, "export_seconds": export_seconds,
        "onnx_optimization": optimization,
    }


def benchmark_stream(name: str, model, chunk_frames: int, seconds: float, sample_rate: int,
                     repeats: int = 3, warmup: int = 1) -> dict:
    """Stream ``seconds`` of random speech-level mel through ``model.stream()``, pushing
    ``chunk_frames`` frames at a time as fast as they are taken, at batch 1.

    Returns ``first_audio_ms`` (median wall time from the first push until a push returned
    samples: the compute part of the latency), ``algorithmic_latency_ms`` (the audio duration
    of the frames that must have arrived before any sample is final: the smallest multiple of
    ``chunk_frames`` above ``lookahead_frames``), the streamed ``real_time_factor`` (total
    wall time over audio duration) and whether the stream is exact."""
    hop = model.hop_length
    frames = max(chunk_frames, int(round(seconds * sample_rate / hop)))
    mel = _speech_level_mel(model.n_mels, frames).to(next(model.parameters()))
    firsts, totals = [], []
    lookahead, exact = 0, True
    for i in range(warmup + repeats):
        stream = model.stream()
        lookahead, exact = stream.lookahead_frames, stream.exact
        first = None
        t0 = time.perf_counter()
        for begin in range(0, frames, chunk_frames):
            if stream.push(mel[..., begin:begin + chunk_frames]).shape[-1] and first is None:
                first = time.perf_counter() - t0
        stream.flush()
        total = time.perf_counter() - t0
        if i >= warmup:
            firsts.append(total if first is None else first)
            totals.append(total)
    needed = -(-(lookahead + 1) // chunk_frames) * chunk_frames
    audio_seconds = frames * hop / sample_rate
    return {
        "model": name, "kind": model.kind, "chunk_frames": chunk_frames,
        "lookahead_frames": lookahead, "exact": exact, "audio_seconds": audio_seconds,
        "first_audio_ms": 1000 * statistics.median(firsts),
        "algorithmic_latency_ms": 1000 * min(needed, frames) * hop / sample_rate,
        "real_time_factor": statistics.median(totals) / audio_seconds,
        "samples_per_s": frames * hop / statistics.median(totals),
    }
