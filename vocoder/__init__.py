"""flow-vocoder: Parallel-WaveNet-style flow vocoders (MAF teacher, IAF student, WaveGlow)."""

__version__ = "0.1.0"


def load_model(path, device="cpu", use_ema: bool = True):
    """Load any checkpoint (teacher, student or WaveGlow) in eval mode; see
    :func:`vocoder.models.load_model`."""
    from vocoder.models import load_model as _load

    return _load(path, device=device, use_ema=use_ema)


__all__ = ["load_model", "__version__"]
