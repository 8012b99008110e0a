"""``vocoder-prepare data=demo|folder|ljspeech [data.root=DIR] run_dir=DIR``."""

from __future__ import annotations

from pathlib import Path

from vocoder.cli.common import front_end, hydra_app, prepare_data
from vocoder.errors import VocoderError


@hydra_app("config")
def main(cfg) -> None:
    features = front_end(cfg)
    min_samples = int(cfg.trainer.segment_frames) * features.hop_length
    corpus = prepare_data(cfg, features, min_samples)
    print(corpus.summary())
    if cfg.export.split:
        if not cfg.export.dir:
            raise VocoderError("export.split needs export.dir=DIR")
        n = export_split(corpus, str(cfg.export.split), Path(str(cfg.export.dir)))
        print(f"exported {n} {cfg.export.split} file(s) to {cfg.export.dir}")


def export_split(corpus, split: str, out_dir: Path) -> int:
    """Write a split's cached audio as 16-bit wavs (and, when known, the true F0 per frame as
    ``f0/<name>.npy``)."""
    import numpy as np

    from vocoder.audio import write_wav

    entries = corpus.entries(split)
    if not entries:
        raise VocoderError(f"{corpus.root}: the {split!r} split is empty")
    sr = int(corpus.features["sample_rate"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for e in entries:
        write_wav(out_dir / f"{e['name']}.wav", np.asarray(corpus.audio(e["name"])) / 32768.0, sr)
        f0 = corpus.f0(e["name"])
        if f0 is not None:
            (out_dir / "f0").mkdir(exist_ok=True)
            np.save(out_dir / "f0" / f"{e['name']}.npy", f0)
    return len(entries)


if __name__ == "__main__":
    main()
