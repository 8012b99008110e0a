"""Where the Hydra configs live (inside the package, so an installed wheel finds them) and the
one reader of an experiment preset outside a Hydra app."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def experiment_arch(experiment: str, kind: str) -> dict:
    """The architecture keywords of model ``kind`` in the ``experiment`` preset
    (``conf/experiment/<experiment>.yaml`` as Hydra composes it, inheritance included)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    known = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
    if experiment not in known:
        raise ValueError(f"unknown experiment {experiment!r}; known: {', '.join(known)}")
    overrides = [f"experiment={experiment}"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its search path is ours
        cfg = compose("config", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose("config", overrides=overrides)
    return dict(OmegaConf.to_container(cfg.arch.get(kind, {}), resolve=True))
