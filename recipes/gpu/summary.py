"""Issue 9's synthesis targets against what ``recipes/gpu/run.sh`` measured.

    python recipes/gpu/summary.py OUT_DIR [DTYPE]        (DTYPE: bf16, the default, or fp32)

Reads every ``OUT_DIR/bench-*/bench.json`` and prints, for the student at batch 1 in DTYPE
(the faster of eager and compiled): its rate against 10 M samples/s, its ratio to WaveGlow at
the same settings against 5x, and its ratio to the teacher's best batch-1 rate against 1000x.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"student": 10e6, "student_over_waveglow": 5.0, "student_over_teacher": 1000.0}


def load_rows(out: Path) -> list[dict]:
    rows = []
    for path in sorted(Path(out).glob("bench-*/bench.json")):
        for row in json.loads(path.read_text())["rows"]:
            rows.append(dict(row, run=path.parent.name))
    return rows


def _best(rows: list[dict], model: str, **match) -> dict | None:
    found = [r for r in rows if r["model"] == model
             and all(r.get(k) == v for k, v in match.items())]
    return max(found, key=lambda r: r["samples_per_s"], default=None)


def _setting(row: dict) -> str:
    return f"{row['dtype']}, batch {row['batch']}, {'compiled' if row['compiled'] else 'eager'}"


def summary(out: Path, dtype: str = "bf16") -> list[str]:
    rows = load_rows(out)
    student = _best(rows, "student", dtype=dtype, batch=1)
    if student is None:
        return [f"no student row in {dtype} at batch 1 under {out}/bench-*"]

    def verdict(value: float, target: float, unit: str = "") -> str:
        return f"target {target:,.0f}{unit}: {'met' if value >= target else 'missed'}"

    rate = student["samples_per_s"]
    lines = [f"student {_setting(student)}, {student['audio_seconds']:.1f} s: {rate:,.0f} "
             f"samples/s ({student.get('fraction_of_floor', 0):.0%} of its floor), "
             + verdict(rate, TARGETS["student"])]
    waveglow = _best(rows, "waveglow", dtype=dtype, batch=1, compiled=student["compiled"])
    if waveglow is not None:
        ratio = rate / waveglow["samples_per_s"]
        lines.append(f"student / WaveGlow at the same settings: {ratio:,.1f}x "
                     f"(WaveGlow {waveglow['samples_per_s']:,.0f}), "
                     + verdict(ratio, TARGETS["student_over_waveglow"], "x"))
    teacher = _best(rows, "teacher", batch=1)
    if teacher is not None:
        ratio = rate / teacher["samples_per_s"]
        lines.append(f"student / teacher's cached sampling ({_setting(teacher)}, "
                     f"{teacher['samples_per_s']:,.0f} samples/s): {ratio:,.0f}x, "
                     + verdict(ratio, TARGETS["student_over_teacher"], "x"))
    return lines


if __name__ == "__main__":
    print("\n".join(summary(Path(sys.argv[1]), *sys.argv[2:3])))
