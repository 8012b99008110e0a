"""``vocoder-convert-waveglow input=FILE output=CKPT [preset=NAME]``: NVIDIA WaveGlow weights
into a flow-vocoder checkpoint.

A handful of ``key=value`` arguments, so no Hydra here. Problems are reported as one line,
``error: <file>: <problem>``, with exit code 2, and leave no output file behind.
"""

from __future__ import annotations

import sys

from vocoder.cli.common import key_value_args
from vocoder.errors import report_errors

USAGE = "usage: vocoder-convert-waveglow input=FILE output=CKPT [preset=tacotron2]"
_KEYS = {"input", "output", "preset"}


@report_errors
def main(argv: list[str] | None = None) -> None:
    args = key_value_args(sys.argv[1:] if argv is None else argv, _KEYS, ("input", "output"),
                          USAGE)
    if args is None:
        return
    from vocoder.waveglow_import import convert_waveglow

    model = convert_waveglow(args["input"], args["output"], args.get("preset", "tacotron2"))
    arch = model.arch_config()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args['output']}: WaveGlow with {arch['n_flows']} flows, n_group "
          f"{arch['n_group']}, {arch['n_layers']} layers x {arch['n_channels']} channels, "
          f"{n_params / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
