"""Honest synthesis timing: the three models on the same mels, device and dtype.

Each model is warmed up, the device synchronised around every repeat, and the median of
several repeats reported. The autoregressive teacher is timed on a shorter clip and its rate
scaled per sample (its cost per sample does not depend on the clip length).

MACs and bytes per output sample are counted from the operators that synthesis runs (on a
fresh copy of the same architecture, on CPU), as the marginal cost of one more sample.

The package: :mod:`~vocoder.bench.counting` (MACs and bytes per sample),
:mod:`~vocoder.bench.timing` (timed runs, numerics, device rates, streaming and onnxruntime)
and :mod:`~vocoder.bench.rendering` (table and chart).
"""

from vocoder.bench.counting import count_bytes_per_sample, count_macs_per_sample
from vocoder.bench.rendering import bar_chart, markdown_table
from vocoder.bench.timing import (
    benchmark_model,
    benchmark_onnx,
    benchmark_stream,
    device_rates,
    environment,
    precision_check,
    time_synthesis,
)

__all__ = ["bar_chart", "benchmark_model", "benchmark_onnx", "benchmark_stream",
           "count_bytes_per_sample", "count_macs_per_sample", "device_rates", "environment",
           "markdown_table", "precision_check", "time_synthesis"]
