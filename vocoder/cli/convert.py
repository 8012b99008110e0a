"""``vocoder-convert-waveglow input=FILE output=CKPT [preset=NAME]``: NVIDIA WaveGlow weights
into a flow-vocoder checkpoint.

A handful of ``key=value`` arguments, so no Hydra here. Problems are reported as one line,
``error: <file>: <problem>``, with exit code 2, and leave no output file behind.
"""

from __future__ import annotations

import sys

from vocoder.errors import VocoderError, report_errors

USAGE = "usage: vocoder-convert-waveglow input=FILE output=CKPT [preset=tacotron2]"
_KEYS = {"input", "output", "preset"}


def parse_args(argv: list[str]) -> dict[str, str]:
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in _KEYS or not value:
            raise VocoderError(f"unexpected argument {arg!r}; {USAGE}")
        args[key] = value
    missing = [k for k in ("input", "output") if k not in args]
    if missing:
        raise VocoderError(f"missing {' and '.join(missing)}=...; {USAGE}")
    return args


@report_errors
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    args = parse_args(argv)
    from vocoder.waveglow_import import convert_waveglow

    model = convert_waveglow(args["input"], args["output"], args.get("preset", "tacotron2"))
    arch = model.arch_config()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args['output']}: WaveGlow with {arch['n_flows']} flows, n_group "
          f"{arch['n_group']}, {arch['n_layers']} layers x {arch['n_channels']} channels, "
          f"{n_params / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
