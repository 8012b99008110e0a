"""The trainer's settings, typed and validated once.

Their values have one home, ``conf/trainer/default.yaml`` (with per-preset changes in
``conf/experiment/*.yaml`` and per-kind ones in ``conf/trainer_for/``, composed by Hydra);
this module only says what each must be. :meth:`TrainerSettings.from_config` turns the
composed ``trainer`` node into a frozen dataclass or fails with one line naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from vocoder.errors import VocoderError

SCHEDULES = ("cosine", "exponential", "constant")
AMP = ("none", "bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    """See ``conf/trainer/default.yaml`` for what each setting does."""

    device: str
    max_steps: int
    batch_size: int
    segment_frames: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    schedule: str
    warmup_steps: int
    lr_min_ratio: float
    lr_half_life: int
    grad_clip: float
    ema_decay: float
    amp: str
    compile: bool
    num_workers: int
    log_every: int
    val_every: int
    val_utterances: int
    val_frames: int
    val_batch_size: int
    ckpt_every: int
    keep_last: int
    audio_every: int
    audio_frames: int
    max_nonfinite: int
    pitch_every: int
    pitch_segments: int
    pitch_frames: int
    pitch_sigma: float | None
    tensorboard: bool
    progress: bool

    @classmethod
    def from_config(cls, node: Mapping) -> TrainerSettings:
        """The ``trainer`` config node (a mapping) as settings; raises :class:`VocoderError`
        for a missing, unknown, mistyped or out-of-range key."""
        values = dict(node.items())
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise VocoderError(f"unknown trainer setting(s): {', '.join(unknown)}")
        missing = sorted(set(fields) - set(values))
        if missing:
            raise VocoderError(f"missing trainer setting(s): {', '.join(missing)}")
        typed = {}
        for name, field in fields.items():
            typed[name] = _convert(name, values[name], field.type)
        settings = cls(**typed)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.schedule not in SCHEDULES:
            _bad("schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        if self.amp not in AMP:
            _bad("amp", self.amp, f"one of {', '.join(AMP)}")
        for name in ("max_steps", "batch_size", "segment_frames", "val_utterances", "val_frames",
                     "val_batch_size", "keep_last", "audio_frames", "max_nonfinite",
                     "log_every", "val_every", "ckpt_every", "lr_half_life"):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "a positive integer")
        for name in ("pitch_segments", "pitch_frames"):
            if getattr(self, name) < 1:
                _bad(name, getattr(self, name), "a positive integer")
        for name in ("warmup_steps", "num_workers", "audio_every", "pitch_every"):
            if getattr(self, name) < 0:
                _bad(name, getattr(self, name), "0 or more")
        if self.pitch_sigma is not None and not self.pitch_sigma > 0:
            _bad("pitch_sigma", self.pitch_sigma, "positive, or null for the model's default")
        if not self.lr > 0:
            _bad("lr", self.lr, "positive")
        if not 0.0 <= self.ema_decay < 1.0:
            _bad("ema_decay", self.ema_decay, "in [0, 1)")
        if not 0.0 <= self.lr_min_ratio <= 1.0:
            _bad("lr_min_ratio", self.lr_min_ratio, "in [0, 1]")
        if self.grad_clip < 0 or self.weight_decay < 0:
            _bad("grad_clip/weight_decay", (self.grad_clip, self.weight_decay), "0 or more")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            _bad("betas", list(self.betas), "two numbers in [0, 1)")

    def changes_from(self, saved: Mapping) -> list[str]:
        """``trainer.KEY OLD -> NEW`` for every setting that differs from ``saved`` (a
        checkpoint's resolved ``trainer`` dict); keys it lacks are skipped."""
        lines = []
        for name, value in dataclasses.asdict(self).items():
            if name in saved:
                old = saved[name]
                if isinstance(value, tuple):
                    old = tuple(old)
                if old != value:
                    lines.append(f"trainer.{name} {old} -> {value}")
        return lines


def _bad(name: str, value, expected: str):
    raise VocoderError(f"trainer.{name}={value}: must be {expected}")


def _convert(name: str, value, kind: str):
    try:
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "int":
            if isinstance(value, bool) or float(value) != int(value):
                raise TypeError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "float | None":
            return None if value is None else _convert(name, value, "float")
        if kind == "str":
            return str(value)
        if kind == "tuple[float, float]":
            pair = tuple(float(v) for v in value)
            if len(pair) != 2:
                raise TypeError
            return pair
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unhandled field type {kind}")
    _bad(name, value, f"of type {kind}")
