"""What exact resume needs beside the weights: the learning-rate schedule (a pure function
of the step and the settings) and the random number generators' states."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import numpy as np
import torch


def lr_factor(settings) -> Callable[[int], float]:
    """The schedule as ``step -> factor`` of ``settings.lr`` (for ``LambdaLR``): linear
    warm-up over ``warmup_steps``, then ``cosine`` decay to ``lr_min_ratio`` at
    ``max_steps``, ``exponential`` halving every ``lr_half_life`` steps, or ``constant``."""
    warmup = max(int(settings.warmup_steps), 0)
    kind = settings.schedule
    total = max(int(settings.max_steps), 1)
    floor = float(settings.lr_min_ratio)

    def factor(step: int) -> float:
        w = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if kind == "constant":
            return w
        if kind == "exponential":
            return w * 0.5 ** (step / float(settings.lr_half_life))
        progress = min(step / total, 1.0)  # cosine (the settings allow no other)
        return w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    return factor


def rng_state() -> dict:
    """The torch, numpy, Python (and CUDA) generators' states, as checkpoint data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(
            np.frombuffer(json.dumps(numpy_state).encode(), dtype=np.uint8).copy()
        ),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = json.loads(bytes(state["numpy"].tolist()).decode())
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random; call before building a model so its init is repeatable."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
