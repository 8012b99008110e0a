"""``vocoder-prepare data=demo|folder|ljspeech [data.root=DIR] run_dir=DIR``."""

from __future__ import annotations

from vocoder.cli.common import front_end, hydra_app, prepare_data


@hydra_app("config")
def main(cfg) -> None:
    features = front_end(cfg)
    min_samples = int(cfg.trainer.segment_frames) * features.hop_length
    corpus = prepare_data(cfg, features, min_samples)
    print(corpus.summary())


if __name__ == "__main__":
    main()
