"""Honest synthesis timing: the three models on the same mels, device and dtype.

Each model is warmed up, the device synchronised around every repeat, and the median of
several repeats reported. The autoregressive teacher is timed on a shorter clip and its rate
scaled per sample (its cost per sample does not depend on the clip length).

MACs and bytes per output sample are counted from the operators that synthesis runs (on a
fresh copy of the same architecture, on CPU), as the marginal cost of one more sample.
"""

from __future__ import annotations

import math
import platform
import statistics
import time

import numpy as np
import torch

from vocoder.synthesis import DTYPES, set_tf32


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _OpCounter:
    """Sums, over every aten op run inside it, the bytes of its tensor inputs (read) and
    outputs (written), and the multiply-accumulates of its matrix products and convolutions.
    View ops move nothing and are skipped; an ``out=`` tensor counts as written once."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                result = func(*args, **kwargs)
                if not func.is_view:
                    out = kwargs.get("out")
                    read = [t for t in torch.utils._pytree.tree_leaves((args, kwargs))
                            if isinstance(t, torch.Tensor) and t is not out]
                    written = [t for t in torch.utils._pytree.tree_leaves(result)
                               if isinstance(t, torch.Tensor)]
                    counter.bytes += sum(t.numel() * t.element_size() for t in read + written)
                    counter.macs += _macs(func, args, result)
                return result

        self.bytes = 0
        self.macs = 0
        self.mode = Mode()


def _macs(func, args, result) -> int:
    """Multiply-accumulates of one matrix product or convolution, from its argument shapes
    (0 for any other op). In-place and ``out=`` forms count like the plain op."""
    name = func.overloadpacket.__name__.rstrip("_")
    if name in ("mm", "bmm", "mv", "dot"):
        a, b = args[0], args[1]
    elif name in ("addmm", "baddbmm", "addmv"):
        a, b = args[1], args[2]
    elif name == "convolution":
        x, weight, transposed = args[0], args[1], args[6]
        kernel = math.prod(weight.shape[2:])
        if transposed:  # weight [C_in, C_out / groups, *k]: each input value meets all of it
            return x.numel() * weight.shape[1] * kernel
        # weight [C_out, C_in / groups, *k]: each output value is a dot of C_in / groups * k
        return result.numel() * weight.shape[1] * kernel
    else:
        return 0
    # a [..., n, k] times b [..., k, m] (or b [k] for a vector product): n * k * m per batch
    return a.numel() * (b.shape[-1] if b.dim() > 1 and name != "dot" else 1)


def _count_per_sample(model, batch: int, frames: int) -> tuple[float, float]:
    """(MACs, bytes) per output sample of eager :meth:`synthesize` at ``batch`` in fp32: the
    count over ``2 * frames`` frames minus the count over ``frames``, divided by the extra
    samples, on a fresh copy on CPU, prepared for inference as the timed models are (weight
    norm removed, WaveGlow's layers fused). Cached per architecture."""
    from vocoder.models import model_from_arch

    key = (model.kind, model.n_mels, model.hop_length, repr(model.arch_config()), batch, frames)
    if key not in _COUNT_CACHE:
        fresh = model_from_arch(model.kind, model.n_mels, model.hop_length,
                            model.arch_config()).eval().prepare_for_inference()
        counts = []
        for n in (frames, 2 * frames):
            mel = torch.full((batch, model.n_mels, n), -5.0)
            counter = _OpCounter()
            with torch.no_grad(), counter.mode:
                fresh.synthesize(mel)
            counts.append((counter.macs, counter.bytes))
        extra = batch * frames * model.hop_length
        _COUNT_CACHE[key] = tuple((b - a) / extra for a, b in zip(*counts, strict=True))
    return _COUNT_CACHE[key]


_COUNT_CACHE: dict[tuple, tuple[float, float]] = {}


def _default_frames(model) -> int:
    # The teacher's per-step Python loop makes counting slow; its cost per step is constant.
    return 1 if model.kind == "teacher" else 4


def count_macs_per_sample(model, frames: int | None = None) -> float:
    """Multiply-accumulates per output sample of synthesis at batch 1, as run.

    Counted from the operators that :meth:`synthesize` runs (matrix products and
    convolutions, whatever form they take: in place, ``out=``, batched), as the marginal cost
    of one more sample, so work done once per call drops out. This is the arithmetic of the
    inference path, which can be less than that of training: the student's baked flows apply
    the mel projections per frame instead of per sample.
    """
    return _count_per_sample(model, 1, frames or _default_frames(model))[0]


def count_bytes_per_sample(model, batch: int = 1, bytes_per_element: int = 4,
                           frames: int | None = None) -> float:
    """Memory traffic per output sample of eager synthesis at ``batch``, from the operators
    it runs.

    Every aten op of :meth:`synthesize` (on CPU, on a fresh copy, in fp32) is taken to read
    its tensor inputs and write its outputs once; the count over ``2 * frames`` frames minus
    the count over ``frames``, divided by the extra samples of all ``batch`` items, is the
    marginal cost of a sample, so weights that a parallel model reads once per call drop out
    while the teacher's per-step weight reads stay in (shared by the batch). Scaled to
    ``bytes_per_element`` (2 for bf16/fp16). Fused or compiled kernels can move less; caches
    can serve some of it. ``frames`` defaults to 4, and to 1 for the teacher.
    """
    moved = _count_per_sample(model, batch, frames or _default_frames(model))[1]
    return moved * bytes_per_element / 4


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
    rng = np.random.default_rng(0)
    # A speech-like level of log-mel values (speed does not depend on them).
    mel = torch.from_numpy(rng.uniform(-8.0, 0.0, (batch, n_mels, frames)).astype(np.float32))
    mel = mel.to(device=device, dtype=DTYPES[dtype])
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


def _maybe(value) -> str:
    return "-" if value is None else f"{value:.2g}"


def markdown_table(rows: list[dict], ratios: dict, env: dict) -> str:
    lines = [
        "| model | device | dtype | batch | audio s | samples/s | RTF | peak MB | params (M) "
        "| MACs/sample | bytes/sample | matmul floor | bandwidth floor | of floor "
        "| rel. error vs fp32 | log-mel L1 vs fp32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['device']} | {r['dtype']} | {r['batch']} | "
            f"{r['audio_seconds']:.2f} | {r['samples_per_s']:,.0f} | {r['real_time_factor']:.4f} | "
            f"{r['peak_memory_mb']:.0f} | {r['parameters'] / 1e6:.2f} | "
            f"{r['macs_per_sample'] / 1e3:,.1f} k | {r.get('bytes_per_sample', 0) / 1e3:,.1f} kB | "
            f"{r.get('matmul_floor_samples_per_s', 0):,.0f} | "
            f"{r.get('bandwidth_floor_samples_per_s', 0):,.0f} | "
            f"{r.get('fraction_of_floor', 0):.0%} | {_maybe(r.get('rel_audio_error_vs_fp32'))} | "
            f"{_maybe(r.get('log_mel_l1_vs_fp32'))} |"
        )
    lines.append("")
    for k, v in ratios.items():
        lines.append(f"- {k.replace('_', ' ')}: {v:,.1f}x")
    lines.append("")
    lines.append(
        f"- machine: {env.get('gpu', env.get('cpu'))}, {env['threads']} thread(s); "
        f"torch {env['torch']}, python {env['python']}"
    )
    rates = env.get("rates", {})
    if rates:
        lines.append("- measured rates: " + ", ".join(
            f"{k.replace('matmul_gmacs_', 'matmul ')} {v:,.1f} "
            f"{'GB/s' if k == 'copy_gbps' else 'GMAC/s'}".replace("copy_gbps", "copy")
            for k, v in rates.items()))
        lines.append("- matmul floor: samples/s if the model's MACs ran at the square-matmul "
                     "rate; bandwidth floor: if its eager ops' bytes moved at the copy rate "
                     "(cache-resident intermediates can beat it); "
                     "of floor: measured over the lower of the two")
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = [f"{r['model']}\n{r['dtype']} b{r['batch']}" for r in rows]
    values = [r["samples_per_s"] for r in rows]
    bars = ax.bar(names, values, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(rows)])
    ax.set_yscale("log")
    ax.set_ylabel("samples / s (log)")
    ax.set_title(f"synthesis speed on {rows[0]['device']}")
    for b, v in zip(bars, values, strict=True):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
