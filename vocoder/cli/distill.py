"""``vocoder-distill teacher=CKPT data=... experiment=... run_dir=DIR trainer.max_steps=N``.

Trains the IAF student (``arch.student``) against the frozen teacher checkpoint by
probability density distillation (:mod:`vocoder.distill`, options under ``distill``) with the
shared trainer. The student uses the teacher's mel preset whatever ``features`` says. The
checkpoint goes to ``DIR/checkpoints/last.pt``; rerunning the command resumes.
"""

from __future__ import annotations

from pathlib import Path

from vocoder.cli.common import (
    fit_and_report,
    hydra_app,
    prepare_data,
)
from vocoder.errors import VocoderError


def _check_segments(cfg, objective, hop_length: int) -> None:
    """Fail before training when segments are too short for the KL skip or the STFT loss."""
    shortest = min(int(cfg.trainer.segment_frames), int(cfg.trainer.val_frames)) * hop_length
    if objective.skip >= shortest:
        raise VocoderError(
            f"segments of {shortest} samples leave nothing after skipping the first "
            f"{objective.skip} steps (the teacher's receptive field): raise "
            f"trainer.segment_frames/trainer.val_frames, or set distill.skip_receptive_field=false"
        )
    if objective.stft is not None and shortest < objective.stft.min_samples():
        raise VocoderError(
            f"segments of {shortest} samples are too short for the STFT loss (needs "
            f"{objective.stft.min_samples()}): raise trainer.segment_frames/trainer.val_frames, "
            f"or set distill.stft_resolutions or distill.lambda_stft=0"
        )


@hydra_app("distill")
def main(cfg) -> None:
    from omegaconf import OmegaConf

    from vocoder.checkpoint import load_checkpoint
    from vocoder.distill import freeze, make_distill_objective
    from vocoder.features import MelFrontEnd
    from vocoder.models import model_from_arch, model_from_checkpoint
    from vocoder.training.state import seed_everything
    from vocoder.training.trainer import Trainer

    if str(cfg.model.kind) != "student":
        raise VocoderError(f"vocoder-distill trains the student, not a {cfg.model.kind} "
                           f"(use vocoder-train for that)")
    teacher_path = Path(str(cfg.teacher)).resolve()
    ckpt = load_checkpoint(teacher_path, kind="teacher")
    teacher = freeze(model_from_checkpoint(ckpt).prepare_for_inference())
    features = MelFrontEnd.from_dict(ckpt["features"])
    if str(cfg.features.preset) != features.config.name:
        print(f"note: using the teacher's mel preset {features.config.name!r}, "
              f"not features={cfg.features.preset}")
    corpus = prepare_data(cfg, features, int(cfg.trainer.segment_frames) * features.hop_length)
    seed_everything(int(cfg.seed))
    arch = OmegaConf.to_container(cfg.arch.student, resolve=True)
    # The student reads its teacher's excitation, pitch predictor included (trained with the
    # teacher, frozen here), so that both see the same source: it has one exactly when the
    # teacher has, unless arch.student.excitation=false opts out.
    if arch.get("excitation") is False:
        arch["excitation"] = None
    elif teacher.excitation is not None:
        arch["excitation"] = teacher.excitation.config()
    else:
        if arch.get("excitation") is not None:
            print(f"note: the teacher {teacher_path.name} has no excitation source (no pitch "
                  f"predictor to share): distilling a student without one")
        arch["excitation"] = None
    student = model_from_arch("student", features.n_mels, features.hop_length, arch,
                              features.sample_rate)
    if student.excitation is not None:
        student.excitation.load_state_dict(teacher.excitation.state_dict())
        student.excitation.requires_grad_(False)
    make_objective = make_distill_objective(teacher, cfg.distill, features)
    objective = make_objective(student)
    _check_segments(cfg, objective, features.hop_length)
    trainer = Trainer(cfg, student, corpus, features.config.to_dict(),
                      make_objective=make_objective,
                      extra={"teacher_checkpoint": str(teacher_path),
                             "teacher_arch": teacher.arch_config(),
                             "teacher_step": int(ckpt.get("step", 0))})
    if trainer.dist.is_main:
        n_params = sum(p.numel() for p in student.parameters())
        print(f"student: {n_params / 1e6:.3f} M parameters in {len(student.flows)} flows; "
              f"teacher {teacher_path} (step {ckpt.get('step', 0)}, receptive field "
              f"{teacher.receptive_field}); KL {objective.estimator}, skipping {objective.skip} "
              f"steps; device {trainer.device}, {trainer.dist.world_size} process(es), global "
              f"batch {int(cfg.trainer.batch_size) * trainer.dist.world_size}")
    fit_and_report(trainer)


if __name__ == "__main__":
    main()
