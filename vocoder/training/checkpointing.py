"""Saving and resuming a :class:`~vocoder.training.trainer.Trainer`'s run: what a checkpoint
holds beyond the model, and how a rerun continues where the last one stopped."""

from __future__ import annotations

import math

import torch

from vocoder.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from vocoder.errors import VocoderError
from vocoder.training.state import lr_factor, rng_state, set_rng_state


def run_checkpoint(trainer) -> dict:
    """The checkpoint dict of ``trainer``'s current state."""
    from omegaconf import OmegaConf

    return make_checkpoint(
        trainer.model,
        trainer.features,
        ema=trainer.ema_model.state_dict(),
        optimizer=trainer.optimizer.state_dict(),
        scheduler=trainer.scheduler.state_dict(),
        scaler=trainer.scaler.state_dict(),
        step=trainer.step,
        data_state={"batches_consumed": trainer.batches_consumed},
        rng=rng_state(),
        config=OmegaConf.to_container(trainer.cfg, resolve=True),
        metrics=dict(trainer.last_val),
        trainer_state={"nonfinite_total": trainer.nonfinite_total, "best_val": trainer.best_val},
        extra=trainer.extra,
    )


def save_run(trainer, best: bool = False) -> None:
    """Write ``step_*.pt`` and ``last.pt`` (and ``best.pt``), keeping the ``keep_last`` newest
    step files; only the main process writes."""
    if not trainer.dist.is_main:
        return
    ckpt = run_checkpoint(trainer)
    step_path = trainer.ckpt_dir / f"step_{trainer.step:08d}.pt"
    save_checkpoint(ckpt, step_path)
    save_checkpoint(ckpt, trainer.ckpt_dir / "last.pt")
    if best:
        save_checkpoint(ckpt, trainer.ckpt_dir / "best.pt")
    old = sorted(trainer.ckpt_dir.glob("step_*.pt"))[: -max(int(trainer.tcfg.keep_last), 1)]
    for p in old:
        p.unlink(missing_ok=True)


def resume_run(trainer) -> bool:
    """Restore ``trainer`` from its ``last.pt`` (False when there is none): model, EMA,
    optimiser, schedule, step, data position, RNG; changed trainer settings are applied."""
    path = trainer.ckpt_dir / "last.pt"
    if not path.exists():
        return False
    ckpt = load_checkpoint(path, map_location=trainer.device, kind=trainer.model.kind)
    if ckpt["features"] != dict(trainer.features):
        raise VocoderError(
            f"{path}: trained with mel preset {ckpt['features'].get('name')!r}, this run uses "
            f"{trainer.features.get('name')!r}; use another run_dir"
        )
    if ckpt["arch"] != trainer.model.arch_config():
        raise VocoderError(
            f"{path}: model architecture differs from this run's config; use another run_dir"
        )
    trainer.model.load_state_dict(ckpt["model"])
    trainer.ema_model.load_state_dict(ckpt["ema"])
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    apply_changed_settings(trainer, ckpt.get("config", {}).get("trainer", {}))
    if "scaler" in ckpt:
        trainer.scaler.load_state_dict(ckpt["scaler"])
    trainer.step = int(ckpt["step"])
    trainer.batches_consumed = int(ckpt["data_state"]["batches_consumed"])
    ts = ckpt.get("trainer_state", {})
    trainer.nonfinite_total = int(ts.get("nonfinite_total", 0))
    trainer.best_val = float(ts.get("best_val", math.inf))
    trainer.last_val = dict(ckpt.get("metrics", {}))
    # Every rank restores rank 0's RNG, then offsets its own the same way as at start.
    set_rng_state(ckpt["rng"])
    if trainer.dist.rank:
        torch.manual_seed(int(torch.randint(0, 2**31, (1,)).item()) + trainer.dist.rank)
    trainer.log(f"resumed from {path} at step {trainer.step}")
    return True


def apply_changed_settings(trainer, saved: dict) -> None:
    """Say which trainer settings differ from the checkpoint's, one line each, and make
    the optimiser follow the new ones (its saved state holds the old learning rate, betas
    and weight decay; every other setting is read afresh anyway)."""
    for line in trainer.tcfg.changes_from(saved):
        trainer.log(f"resume: {line} (applied)")
    factor = lr_factor(trainer.tcfg)(trainer.scheduler.last_epoch)
    trainer.scheduler.base_lrs = [trainer.tcfg.lr for _ in trainer.optimizer.param_groups]
    for group in trainer.optimizer.param_groups:
        group.update(initial_lr=trainer.tcfg.lr, lr=trainer.tcfg.lr * factor,
                     betas=trainer.tcfg.betas, weight_decay=trainer.tcfg.weight_decay)
