"""Inference speed of two versions of the package at paper size, interleaved in one process.

    PYTHONPATH=DIR_WITH_OLD python recipes/bench/before_after.py OLD_PACKAGE [--rounds N]

OLD_PACKAGE is an importable copy of an earlier ``vocoder`` (e.g. ``git archive`` of a commit
into DIR/vocoder_old with its imports renamed). Both versions get the same random weights
(the old model's state dict is loaded into the new one), the same mel and the same noise; the
outputs are compared, then each round times old and new back to back (order alternating per
round) and the medians are printed. Only meant for refactors that keep the state-dict layout.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch

ARCH = {
    "student": dict(flow_layers=[10, 10, 10, 30], cycle_length=10, residual_channels=64,
                    gate_channels=128, skip_channels=64, kernel_size=3, cond_channels=80,
                    log_sigma_init=-3.0),
    "waveglow": dict(n_flows=12, n_group=8, n_early_every=4, n_early_size=2, n_layers=8,
                     n_channels=256, kernel_size=3),
    "teacher": dict(n_layers=24, cycle_length=8, residual_channels=128, gate_channels=256,
                    skip_channels=128, kernel_size=3, cond_channels=80),
}
SECONDS = {"student": 2.0, "waveglow": 2.0, "teacher": 0.2}


def build(package: str, kind: str, state: dict):
    cls = importlib.import_module(f"{package}.models").model_class(kind)
    model = cls(n_mels=80, hop_length=256, **ARCH[kind])
    model.load_state_dict(state)
    return model.prepare_for_inference().eval()


def run(model, kind: str, mel, z):
    with torch.inference_mode():
        if kind == "waveglow":
            return model.decode(z * model.sigma, mel)
        return model.sample(mel, z=z)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("old")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--kinds", default="student,waveglow,teacher")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for kind in args.kinds.split(","):
        torch.manual_seed(0)
        reference = importlib.import_module(f"{args.old}.models").model_class(kind)(
            n_mels=80, hop_length=256, **ARCH[kind])
        new = build("vocoder", kind, reference.state_dict())
        old = build(args.old, kind, reference.state_dict())
        frames = round(SECONDS[kind] * 22050 / 256)
        gen = torch.Generator().manual_seed(1)
        mel = torch.randn(1, 80, frames, generator=gen) - 5.0
        z = torch.randn(1, frames * 256, generator=gen)
        a, b = run(old, kind, mel, z), run(new, kind, mel, z)
        diff = float((a - b).abs().max() / a.abs().max())
        times = {"old": [], "new": []}
        for r in range(args.rounds):
            order = [("old", old), ("new", new)] if r % 2 == 0 else [("new", new), ("old", old)]
            for name, model in order:
                start = time.perf_counter()
                run(model, kind, mel, z)
                times[name].append(time.perf_counter() - start)
        rate = {k: frames * 256 / statistics.median(v) for k, v in times.items()}
        print(f"{kind:9s} old {rate['old']:10,.0f} samples/s  new {rate['new']:10,.0f} "
              f"samples/s  new/old {rate['new'] / rate['old']:.3f}  max rel diff {diff:.1e}  "
              f"per-round new/old "
              + " ".join(f"{o / n:.2f}" for o, n in zip(times['old'], times['new'], strict=True)))


if __name__ == "__main__":
    main()
