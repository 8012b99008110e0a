"""``vocoder-train model=teacher|waveglow data=... experiment=... run_dir=DIR``.

Trains by maximum likelihood with the shared trainer; rerunning the command resumes.
"""

from __future__ import annotations

from vocoder.cli.common import (
    fit_and_report,
    front_end,
    hydra_app,
    prepare_data,
)
from vocoder.errors import VocoderError


@hydra_app("config")
def main(cfg) -> None:
    from vocoder.models import model_from_arch
    from vocoder.training.state import seed_everything
    from vocoder.training.trainer import Trainer

    kind = str(cfg.model.kind)
    if kind == "student":
        raise VocoderError(
            "the student is trained by distillation: use vocoder-distill teacher=CKPT"
        )
    features = front_end(cfg)
    min_samples = int(cfg.trainer.segment_frames) * features.hop_length
    corpus = prepare_data(cfg, features, min_samples)
    seed_everything(int(cfg.seed))
    model = model_from_arch(kind, features.n_mels, features.hop_length, dict(cfg.arch[kind]),
                            features.sample_rate)
    trainer = Trainer(cfg, model, corpus, features.config.to_dict())
    n_params = sum(p.numel() for p in model.parameters())
    if trainer.dist.is_main:
        print(
            f"{kind}: {n_params / 1e6:.3f} M parameters, device {trainer.device}, "
            f"{trainer.dist.world_size} process(es), global batch "
            f"{int(cfg.trainer.batch_size) * trainer.dist.world_size}"
        )
    fit_and_report(trainer)


if __name__ == "__main__":
    main()
