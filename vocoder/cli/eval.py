"""``vocoder-eval checkpoint=CKPT input=DIR_OR_FILE output=DIR``: copy-synthesis quality.

Each recording goes through the checkpoint's own mel front end and back through the model;
the result is compared with the recording (:mod:`vocoder.metrics`). With ``synthesis=DIR``
the model is not run: ``DIR/<name>.wav`` (e.g. what ``vocoder-synth`` wrote for the same
input) is scored instead. Writes::

    DIR/metrics.json   checkpoint, kind, per-file rows, means, definitions
    DIR/metrics.md     the same as a table
    DIR/wavs/<name>.wav  the synthesised audio, as long as its reference
    DIR/report.html    with report=true (audio players and mel pictures)

Options: ``synthesis=DIR``, ``device=cpu|cuda|auto``, ``sigma=S``, ``max_files=N``,
``f0_dir=DIR`` (true F0 contours ``<stem>.npy``, e.g. the demo corpus cache's ``f0/``),
``teacher=CKPT`` (NLL of the synthesis under a teacher), ``report=true``. An unreadable file
(or a missing synthesised one) is one ``warning:`` line and is skipped; when none can be read
the command fails with ``error:`` and exit code 2.
"""

from __future__ import annotations

from pathlib import Path

from vocoder.cli.common import hydra_app
from vocoder.errors import VocoderError


@hydra_app("eval")
def main(cfg) -> None:
    from omegaconf import OmegaConf

    from vocoder.evaluation import HEADLINE, evaluate
    from vocoder.report import format_metric

    for key in ("checkpoint", "input", "output"):
        if OmegaConf.is_missing(cfg, key) or cfg[key] is None:
            raise VocoderError(f"{key}=... is required "
                               "(vocoder-eval checkpoint=CKPT input=DIR output=DIR)")
    result = evaluate(
        cfg.checkpoint, cfg.input, cfg.output, synthesis=cfg.get("synthesis"),
        device=str(cfg.device), sigma=cfg.sigma, max_files=cfg.max_files, f0_dir=cfg.f0_dir,
        teacher=cfg.teacher, report=bool(cfg.report), seed=int(cfg.seed),
        n_mfcc=int(cfg.n_mfcc), f0_fmin=float(cfg.f0_fmin), f0_fmax=float(cfg.f0_fmax))
    mean = result["mean"]
    print(f"{result['kind']}: {mean['files']} file(s), " + ", ".join(
        f"{k}={format_metric(mean[k])}" for k in HEADLINE if k in mean))
    print(f"metrics: {Path(str(cfg.output)) / 'metrics.json'}")


if __name__ == "__main__":
    main()
