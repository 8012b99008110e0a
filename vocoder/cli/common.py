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


def apply_model_trainer_settings(cfg, kind: str):
    """Merge the experiment's ``trainer_by_model[kind]`` into ``cfg.trainer``.

    Presets hold one trainer block for all kinds plus per-kind differences (WaveGlow wants a
    smaller learning rate and longer segments than the teacher, say). Keys given on the
    command line still win.
    """
    from omegaconf import OmegaConf, open_dict

    per_kind = (cfg.get("trainer_by_model") or {}).get(kind)
    if not per_kind:
        return cfg
    explicit = set()
    try:
        from hydra.core.hydra_config import HydraConfig

        for o in HydraConfig.get().overrides.task:
            key = o.split("=", 1)[0].lstrip("+~")
            if key.startswith("trainer."):
                explicit.add(key[len("trainer."):])
    except ValueError:  # not inside a Hydra app (tests compose configs themselves)
        pass
    with open_dict(cfg):
        for key, value in OmegaConf.to_container(per_kind, resolve=True).items():
            if key not in explicit:
                cfg.trainer[key] = value
    return cfg


def fit_and_report(trainer) -> None:
    """Run ``trainer.fit()``, print where the checkpoint went, and leave the process group."""
    from vocoder.training.distributed import cleanup

    metrics = trainer.fit()
    if trainer.dist.is_main:
        summary = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"checkpoint: {trainer.ckpt_dir / 'last.pt'} (step {trainer.step}); {summary}")
    cleanup(trainer.dist)
