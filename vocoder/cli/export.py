"""``vocoder-export checkpoint=CKPT output=FILE.onnx [sigma=S] [opset=N]``: a student or WaveGlow
checkpoint as an ONNX graph ``(mel, z) -> audio`` (see :mod:`vocoder.export`).

A handful of ``key=value`` arguments, so no Hydra here. Problems (a teacher checkpoint, a
missing package, a bad value) are one line, ``error: ...``, with exit code 2, and leave no
output file behind.
"""

from __future__ import annotations

import sys
import time

from vocoder.cli.common import key_value_args
from vocoder.errors import VocoderError, report_errors

USAGE = "usage: vocoder-export checkpoint=CKPT output=FILE.onnx [sigma=S] [opset=N] [check=true]"
_KEYS = {"checkpoint", "output", "sigma", "opset", "check"}


def parse_args(argv: list[str]) -> dict[str, str] | None:
    args = key_value_args(argv, _KEYS, ("checkpoint", "output"), USAGE)
    if args is None:
        return None
    for key, kind in (("sigma", float), ("opset", int)):
        if key in args:
            try:
                kind(args[key])
            except ValueError:
                raise VocoderError(f"{key}={args[key]!r} is not a number; {USAGE}") from None
    if args.get("check", "true") not in ("true", "false"):
        raise VocoderError(f"check must be true or false, got {args['check']!r}")
    return args


@report_errors
def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args is None:
        return
    import torch

    from vocoder.export import DEFAULT_OPSET, OnnxVocoder, export_onnx
    from vocoder.models import load_model

    model = load_model(args["checkpoint"])
    if model.kind not in ("student", "waveglow"):
        export_onnx(model, args["output"])  # raises the one-line reason
    sigma = float(args["sigma"]) if "sigma" in args else None
    start = time.perf_counter()
    path = export_onnx(model, args["output"], sigma=sigma,
                       opset=int(args.get("opset", DEFAULT_OPSET)))
    seconds = time.perf_counter() - start
    line = f"wrote {path}: {model.kind}, opset {args.get('opset', DEFAULT_OPSET)}, " \
           f"exported in {seconds:.0f} s"
    if args.get("check", "true") == "true":
        # One short random utterance through both: the graph must compute what the model does.
        graph = OnnxVocoder(path)
        mel = model.features(0.1 * torch.randn(2, 24 * model.hop_length))
        z = torch.randn(mel.shape[0], mel.shape[-1] * model.hop_length)
        expected = model.synthesize(mel, sigma=graph.sigma, z=z)
        error = float((graph.synthesize(mel, z=z) - expected).abs().max()
                      / expected.abs().max().clamp_min(1e-12))
        line += f"; onnxruntime matches PyTorch to {error:.1e} (max relative)"
    print(line)


if __name__ == "__main__":
    main()
