"""Counting what synthesis costs per output sample: multiply-accumulates and bytes moved,
from the aten operators it actually runs (on a fresh CPU copy of the model)."""

from __future__ import annotations

import math

import torch


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
