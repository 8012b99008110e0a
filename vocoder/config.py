"""Where the Hydra configs live (inside the package, so an installed wheel finds them) and the
one reader of an experiment preset outside a Hydra app."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def experiment_arch(experiment: str, kind: str) -> dict:
    """The architecture keywords of model ``kind`` in ``conf/experiment/<experiment>.yaml``."""
    from omegaconf import OmegaConf

    path = Path(CONF_DIR) / "experiment" / f"{experiment}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown experiment {experiment!r}; known: {', '.join(known)}")
    arch = OmegaConf.load(path).get("arch", {})
    return dict(OmegaConf.to_container(arch.get(kind, {}), resolve=True))
