"""The one trainer, shared by the teacher, WaveGlow and the distilled student.

What it guarantees:

* **Checkpoints** go to ``RUN_DIR/checkpoints/``: ``last.pt``, ``best.pt`` (lowest validation
  loss) and the ``keep_last`` most recent ``step_*.pt``, each written atomically.
* **Resume**: rerunning the same command continues from ``last.pt`` with model, optimiser,
  scheduler, EMA, step, data position and RNG states restored, so N steps + resume + M steps
  equals N + M steps in one go.
* **Interruption**: SIGINT/SIGTERM save a checkpoint at the next step boundary and exit.
* **Numerical faults**: a non-finite loss or gradient skips the step (counted and logged);
  ``max_nonfinite`` in a row stop the run after saving the last good state.
* **Scale-out**: under torchrun every process trains on its shard (DDP); only rank 0 writes.

The trained module is ``model`` (a :class:`~vocoder.models.base.Vocoder`); the loss comes from
``make_objective(model)``, an ``nn.Module`` whose ``forward(audio, mel)`` returns
``(loss, metrics)``. The default objective is the model's own ``training_loss``.
"""

from __future__ import annotations

import copy
import math
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from vocoder.data.corpus import PreparedCorpus
from vocoder.data.dataset import SegmentDataset, SegmentSampler, validation_batches
from vocoder.errors import VocoderError
from vocoder.training import distributed as D
from vocoder.training.checkpointing import resume_run, save_run
from vocoder.training.logs import RunLog
from vocoder.training.settings import TrainerSettings
from vocoder.training.state import lr_factor, seed_everything


class TrainingLoss(nn.Module):
    """Default objective: the model's own ``training_loss`` (maximum likelihood)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, audio, mel):
        return self.model.training_loss(audio, mel)


class NonFiniteError(VocoderError):
    pass


class Trainer:
    """Trains ``model`` on a prepared corpus; see the module docstring for the guarantees.

    ``cfg`` is the full run config (needs ``trainer``, ``seed``, ``run_dir``); ``features`` is
    the MelConfig dict stored in checkpoints; ``extra`` goes into every checkpoint.
    """

    def __init__(
        self,
        cfg,
        model: nn.Module,
        corpus: PreparedCorpus,
        features: dict,
        make_objective: Callable[[nn.Module], nn.Module] = TrainingLoss,
        extra: dict | None = None,
        log=print,
    ):
        self.cfg, self.tcfg = cfg, TrainerSettings.from_config(cfg.trainer)
        self.features, self.extra, self.log = features, dict(extra or {}), log
        self.dist = D.init_distributed(str(self.tcfg.device))
        self.device = D.resolve_device(str(self.tcfg.device), self.dist)
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.corpus = corpus

        seed_everything(int(cfg.seed) + self.dist.rank)

        self.model = model.to(self.device)
        self.ema_model = copy.deepcopy(self.model).eval()
        for p in self.ema_model.parameters():
            p.requires_grad_(False)
        self.objective = make_objective(self.model).to(self.device)
        self.ema_objective = make_objective(self.ema_model).to(self.device)
        self.train_objective = self.objective
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_objective = DDP(
                self.objective,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        if self.tcfg.compile:
            # The loss (models' forward, and the teacher's in distillation) through
            # torch.compile; the first steps compile. Checkpoints hold the plain modules.
            self.train_objective = torch.compile(self.train_objective)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            params,
            lr=float(self.tcfg.lr),
            betas=tuple(self.tcfg.betas),
            weight_decay=float(self.tcfg.weight_decay),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(self.tcfg))
        amp = self.tcfg.amp
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        if self.amp_dtype is not None and self.device.type != "cuda":
            self.log(f"note: trainer.amp={amp} applies on CUDA only; training in fp32 on CPU")
            self.amp_dtype = None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

        self.step = 0
        self.batches_consumed = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.best_val = math.inf
        self.last_val: dict = {}
        self._stop_signal: int | None = None
        self.logs = RunLog(self.run_dir, self.dist.is_main, self.tcfg.tensorboard, log)

    # ------------------------------------------------------------------ checkpoints
    def save(self, best: bool = False) -> None:
        save_run(self, best)

    def resume(self) -> bool:
        return resume_run(self)

    # ------------------------------------------------------------------ validation
    def _log_audio(self, batch) -> None:
        """A generated sample of the first validation item, beside its recording."""
        if not self.logs.has_media or not hasattr(self.ema_model, "synthesize"):
            return
        audio, mel = batch
        frames = min(int(self.tcfg.audio_frames), mel.shape[-1])
        with torch.no_grad():
            fake = self.ema_model.synthesize(mel[:1, :, :frames].to(self.device)).float().cpu()
        self.logs.audio_and_mel(self.step, audio[0, :fake.shape[-1]], fake[0],
                                int(self.features["sample_rate"]), self.features)

    @torch.no_grad()
    def validate(self, batches) -> dict:
        self.ema_objective.eval()
        totals: dict[str, float] = defaultdict(float)
        count = 0
        for audio, mel in batches:
            audio, mel = audio.to(self.device), mel.to(self.device)
            loss, metrics = self.ema_objective(audio, mel)
            n = audio.shape[0]
            totals["loss"] += float(loss) * n
            for k, v in metrics.items():
                totals[k] += float(v) * n
            count += n
        return {k: v / max(count, 1) for k, v in totals.items()}

    def _pitch_probe(self, split: str):
        """The fixed segments pitch is measured on (None when disabled or too short)."""
        if not self.tcfg.pitch_every or not hasattr(self.ema_model, "synthesize"):
            return None
        from vocoder.training.pitch import PitchProbe

        try:
            return PitchProbe(self.corpus, split, self.tcfg.pitch_segments,
                              self.tcfg.pitch_frames, seed=int(self.cfg.seed))
        except ValueError as e:
            self.log(f"note: no pitch measurement ({e})")
            return None

    # ------------------------------------------------------------------ the loop
    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = float(self.tcfg.ema_decay)
        # Early in training a plain average of what was seen beats a cold EMA.
        decay = min(decay, (1 + self.step) / (10 + self.step))
        ema_params = [p for p in self.ema_model.parameters()]
        params = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for be, b in zip(self.ema_model.buffers(), self.model.buffers(), strict=True):
            be.copy_(b)

    def _train_step(self, audio, mel) -> tuple[bool, dict]:
        """One optimiser step; returns (applied, metrics)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(
            self.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            loss, metrics = self.train_objective(audio, mel)
        # Backward runs even for a non-finite loss so every DDP rank joins the gradient
        # all-reduce; the non-finite gradients it makes are then discarded everywhere.
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = float(self.tcfg.grad_clip) if self.tcfg.grad_clip else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        metrics = dict(metrics, grad_norm=float(grad_norm))
        finite = not D.all_reduce_flag(not finite, self.dist, self.device)
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self._update_ema()
            metrics["loss"] = float(loss.detach())
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update(self.scaler.get_scale() / 2)
        return finite, metrics

    def fit(self) -> dict:
        """Train until ``trainer.max_steps``; returns the last validation metrics."""
        t = self.tcfg
        self.resume()
        max_steps = int(t.max_steps)
        if self.step >= max_steps:
            self.log(f"already at step {self.step} >= trainer.max_steps={max_steps}; nothing to do")
            return self.last_val
        self.logs.open()
        segment_frames = int(t.segment_frames)
        dataset = SegmentDataset(self.corpus, "train", segment_frames)
        sampler = SegmentSampler(
            len(dataset),
            int(self.cfg.seed),
            self.dist.rank,
            self.dist.world_size,
            start=self.batches_consumed * int(t.batch_size),
        )
        loader = DataLoader(
            dataset,
            batch_size=int(t.batch_size),
            sampler=sampler,
            num_workers=int(t.num_workers),
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            generator=torch.Generator(),
            multiprocessing_context="fork" if int(t.num_workers) > 0 else None,
        )
        val_batches, probe = [], None
        if self.dist.is_main:
            val_split = "valid" if self.corpus.entries("valid") else "train"
            val_frames = min(
                int(t.val_frames), max(e["frames"] for e in self.corpus.entries(val_split))
            )
            val_batches = validation_batches(
                self.corpus, val_split, int(t.val_utterances), val_frames, int(t.val_batch_size)
            )
            probe = self._pitch_probe(val_split)
        previous_handlers = self._install_signal_handlers()
        progress = None
        if self.dist.is_main and t.progress:
            from tqdm import tqdm

            progress = tqdm(
                total=max_steps,
                initial=self.step,
                desc=f"train {self.model.kind}",
                unit="step",
                dynamic_ncols=True,
            )
        running: dict[str, float] = defaultdict(float)
        n_running, t_last, samples_last = 0, time.perf_counter(), 0
        try:
            for audio, mel in loader:
                audio = audio.to(self.device, non_blocking=True)
                mel = mel.to(self.device, non_blocking=True)
                set_progress = getattr(self.model, "set_training_progress", None)
                if set_progress is not None:  # e.g. the teacher's input-noise cut-off
                    set_progress(self.step, max_steps)
                applied, metrics = self._train_step(audio, mel)
                self.batches_consumed += 1
                samples_last += audio.numel() * self.dist.world_size
                if not applied:
                    self.nonfinite_total += 1
                    self.nonfinite_run += 1
                    self.log(
                        f"warning: step {self.step}: non-finite loss or gradient, step skipped "
                        f"({self.nonfinite_run} in a row, {self.nonfinite_total} in total)"
                    )
                    self.logs.write("nonfinite", self.step, {"in_a_row": self.nonfinite_run,
                                                             "total": self.nonfinite_total})
                    if self.nonfinite_run >= int(t.max_nonfinite):
                        self.save()
                        raise NonFiniteError(
                            f"{self.nonfinite_run} non-finite steps in a row at step {self.step}: "
                            f"the learning rate ({self.scheduler.get_last_lr()[0]:.2e}) is likely "
                            f"too high, or the data holds extreme values; the last good state is "
                            f"in {self.ckpt_dir / 'last.pt'}"
                        )
                    continue
                self.nonfinite_run = 0
                self.step += 1
                for k, v in metrics.items():
                    running[k] += v
                n_running += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}")
                if self.step % int(t.log_every) == 0 or self.step == max_steps:
                    elapsed = time.perf_counter() - t_last
                    row = {k: v / n_running for k, v in running.items()}
                    row.update(
                        lr=self.scheduler.get_last_lr()[0],
                        samples_per_s=samples_last / max(elapsed, 1e-9),
                        steps_per_s=n_running / max(elapsed, 1e-9),
                    )
                    self.logs.write("train", self.step, row)
                    running.clear()
                    n_running, t_last, samples_last = 0, time.perf_counter(), 0
                due_val = self.step % int(t.val_every) == 0 or self.step == max_steps
                best = False
                if due_val and self.dist.is_main and val_batches:
                    # Validation draws its noise from its own fixed seed: comparable numbers
                    # across evaluations, and the training RNG stream is left untouched.
                    with torch.random.fork_rng(
                        devices=[self.device] if self.device.type == "cuda" else []
                    ):
                        torch.manual_seed(int(self.cfg.seed))
                        self.last_val = self.validate(val_batches)
                        if t.audio_every and self.step % int(t.audio_every) == 0:
                            self._log_audio(val_batches[0])
                    best = self.last_val["loss"] < self.best_val
                    self.best_val = min(self.best_val, self.last_val["loss"])
                    self.logs.write("valid", self.step, self.last_val)
                    (progress.write if progress is not None else self.log)(
                        f"step {self.step}: validation "
                        + ", ".join(f"{k}={v:.4f}" for k, v in self.last_val.items())
                    )
                    if probe is not None and (self.step % t.pitch_every == 0
                                              or self.step == max_steps):
                        pitch = probe.measure(self.ema_model, self.device, t.pitch_sigma)
                        self.logs.write("pitch", self.step, pitch)
                        (progress.write if progress is not None else self.log)(
                            f"step {self.step}: pitch "
                            + ", ".join(f"{k}={v:.3f}" for k, v in pitch.items())
                        )
                stop = D.all_reduce_flag(self._stop_signal is not None, self.dist, self.device)
                if self.step % int(t.ckpt_every) == 0 or self.step == max_steps or stop or best:
                    self.save(best=best)
                    D.barrier(self.dist)
                if stop:
                    self.log(
                        f"stopped by signal at step {self.step}; checkpoint saved to "
                        f"{self.ckpt_dir / 'last.pt'}; rerun the same command to resume"
                    )
                    break
                if self.step >= max_steps:
                    break
        finally:
            if progress is not None:
                progress.close()
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
            self.logs.close()
        return self.last_val
