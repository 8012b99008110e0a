"""flow-vocoder: Parallel-WaveNet-style flow vocoders (MAF teacher, IAF student, WaveGlow)."""

__version__ = "0.1.0"


def load_model(path, device="cpu", use_ema: bool = True):
    """Load any checkpoint (teacher, student or WaveGlow) in eval mode; see
    :func:`vocoder.models.load_model`."""
    from vocoder.models import load_model as _load

    return _load(path, device=device, use_ema=use_ema)


def build_model(kind: str, preset: str = "tacotron2", experiment: str = "debug",
                **arch_overrides):
    """A fresh model of a config preset's sizes carrying its front end as ``model.features``;
    see :func:`vocoder.models.build_model`."""
    from vocoder.models import build_model as _build

    return _build(kind, preset=preset, experiment=experiment, **arch_overrides)


__all__ = ["build_model", "load_model", "__version__"]
