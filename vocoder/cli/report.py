"""``python -m vocoder.cli.report exp=DIR``: one HTML page comparing the recipe's models."""

from __future__ import annotations

import json
from pathlib import Path

from vocoder.cli.common import hydra_app
from vocoder.errors import VocoderError


@hydra_app("report")
def main(cfg) -> None:
    from vocoder.features import MelFrontEnd
    from vocoder.report import write_html_report

    exp = Path(str(cfg.exp))
    models, metrics = {}, {}
    for name in cfg.models:
        folder = exp / "eval" / str(name)
        if (folder / "metrics.json").is_file():
            models[str(name)] = folder / "wavs"
            metrics[str(name)] = json.loads((folder / "metrics.json").read_text())
    if not models:
        raise VocoderError(f"{exp}/eval: no model's metrics.json found; run the eval stage first")
    first = next(iter(metrics.values()))
    features = MelFrontEnd.from_dict(first["features"]) if "features" in first else None
    chart, table = exp / "bench" / "bench.png", exp / "bench" / "bench.json"
    bench = json.loads(table.read_text()) if table.is_file() else None
    page = write_html_report(exp, None, models, exp / "test_audio",
                             bench_png=chart if chart.is_file() else None, metrics=metrics,
                             features=features, title=str(cfg.title), bench=bench)
    print(f"report: {page}")
    for name, m in metrics.items():
        mean = m.get("mean", {})
        print(f"  {name:9s} " + ", ".join(
            f"{k}={v:.3f}" for k, v in mean.items() if isinstance(v, (int, float))))


if __name__ == "__main__":
    main()
