"""What the Hydra command-line apps share: the config folder, device and data set-up."""

from __future__ import annotations

import os

from vocoder.config import CONF_DIR


def hydra_app(config_name: str):
    """``@hydra.main`` on the package's ``conf/`` folder, with one-line errors."""
    import hydra

    from vocoder.errors import report_errors

    def decorate(fn):
        return hydra.main(version_base=None, config_path=CONF_DIR, config_name=config_name)(
            report_errors(fn)
        )

    return decorate


def key_value_args(argv: list[str], keys: set[str], required: tuple[str, ...],
                   usage: str) -> dict[str, str] | None:
    """``key=value`` arguments of a command without Hydra: a dict, or ``None`` after printing
    ``usage`` for ``-h``/``--help``; an unknown key, an empty value or a missing required key
    is one :class:`~vocoder.errors.VocoderError` line naming it."""
    from vocoder.errors import VocoderError

    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return None
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in keys or not value:
            raise VocoderError(f"unexpected argument {arg!r}; {usage}")
        args[key] = value
    missing = [k for k in required if k not in args]
    if missing:
        raise VocoderError(f"missing {' and '.join(missing)}=...; {usage}")
    return args


def front_end(cfg):
    from vocoder.features import MelFrontEnd

    return MelFrontEnd.from_preset(str(cfg.features.preset))


def prepare_data(cfg, features, min_samples: int = 0):
    from vocoder.data.corpus import prepare_corpus

    main_process = int(os.environ.get("RANK", "0")) == 0
    if not main_process:
        # Other torchrun ranks wait for rank 0's cache (it is keyed, so they find the same one).
        from vocoder.training.distributed import barrier, init_distributed

        info = init_distributed(str(cfg.trainer.device))
        barrier(info)
        return prepare_corpus(cfg.data, features, cfg.data.cache_dir, min_samples,
                              log=lambda *a, **k: None, progress=False)
    corpus = prepare_corpus(cfg.data, features, cfg.data.cache_dir, min_samples)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from vocoder.training.distributed import barrier, init_distributed

        barrier(init_distributed(str(cfg.trainer.device)))
    return corpus


def fit_and_report(trainer) -> None:
    """Run ``trainer.fit()``, print where the checkpoint went, and leave the process group."""
    from vocoder.training.distributed import cleanup

    metrics = trainer.fit()
    if trainer.dist.is_main:
        summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"checkpoint: {trainer.ckpt_dir / 'last.pt'} (step {trainer.step}); {summary}")
    cleanup(trainer.dist)
