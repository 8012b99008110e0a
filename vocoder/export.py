"""ONNX export of the parallel models, and running the exported graphs with onnxruntime.

:func:`export_onnx` writes one graph per model: inputs ``mel`` (float32 ``[B, n_mels, F]``, the
model's own log-mel) and ``z`` (float32 ``[B, F * hop]``, standard normal noise), output
``audio`` (``[B, F * hop]``), with batch and frame count dynamic. The temperature ``sigma`` is
fixed at export. The graph's metadata carry the model kind, ``n_mels``, ``hop_length``,
``sigma`` and the mel front end, so :class:`OnnxVocoder` can read mels the way the model does.

* **Student**: the module forward of its flows (:meth:`~vocoder.models.student.Student.forward`)
  on ``sigma * z``.
* **WaveGlow**: its inverse pass (:meth:`~vocoder.models.waveglow.WaveGlow.decode`) after
  :meth:`~vocoder.models.waveglow.WaveGlow.prepare_for_inference`, so every inverse 1x1 weight
  is computed once, in float64, at export and stored in the graph as a constant.
* **Teacher**: refused (:class:`~vocoder.errors.VocoderError`): its sampling is a loop of one
  network step per sample, which is what the student exists to replace.

``onnx``, ``onnxscript`` (the exporter) and ``onnxruntime`` are optional: imported only here,
with a one-line error naming the missing package.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from vocoder.atomic import atomic_path
from vocoder.errors import VocoderError

EXPORTABLE = ("student", "waveglow")
DEFAULT_OPSET = 18
_META_KEY = "vocoder"


def _require(module: str, purpose: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise VocoderError(f"{purpose} needs the '{module}' package "
                           f"(pip install 'flow-vocoder[onnx]'): {e}") from None


class _SynthesisGraph(nn.Module):
    """``(mel, z) -> audio`` at a fixed temperature: what the exported graph computes."""

    def __init__(self, model: nn.Module, sigma: float):
        super().__init__()
        self.model = model
        self.sigma = float(sigma)

    def forward(self, mel: Tensor, z: Tensor) -> Tensor:
        z = z * self.sigma
        if self.model.kind == "student":
            return self.model(z, mel)[0]
        return self.model.decode(z, mel)


class _FixedInverse(nn.Module):
    """An invertible 1x1 convolution's inverse as a constant kernel ``[C, C, 1]`` (computed in
    float64 before export), so the graph holds no matrix inversion."""

    def __init__(self, kernel: Tensor):
        super().__init__()
        self.register_buffer("kernel", kernel.detach().float().clone())

    def inverse(self, y: Tensor) -> Tensor:
        return torch.nn.functional.conv1d(y, self.kernel)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress to stdout and logs and warns about things that do not
    concern a user of the command (torchvision being absent, axis names): keep it quiet."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def default_sigma(model: nn.Module) -> float:
    """The temperature the model's own ``synthesize`` uses when given none."""
    return float(getattr(model, "sigma", 1.0)) if model.kind == "waveglow" else 1.0


def export_onnx(model: nn.Module, path: str | os.PathLike, sigma: float | None = None,
                opset: int = DEFAULT_OPSET, example_frames: int = 16) -> Path:
    """Write ``model`` (student or WaveGlow) as an ONNX graph to ``path`` (atomically) and
    return the path. ``sigma`` (``None``: the model's synthesis default) is fixed in the graph.
    The model itself is not changed (a float32 CPU copy is exported)."""
    kind = getattr(model, "kind", "")
    if kind == "teacher":
        raise VocoderError("the teacher cannot be exported: it samples one network step per "
                           "audio sample; distil a student (vocoder-distill) and export that")
    if kind not in EXPORTABLE:
        raise VocoderError(f"cannot export a model of kind {kind!r} (exportable: "
                           f"{', '.join(EXPORTABLE)})")
    _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    sigma = default_sigma(model) if sigma is None else float(sigma)
    if not sigma > 0:
        raise VocoderError(f"sigma must be positive, got {sigma}")
    features = model.features
    copied = copy.deepcopy(model).float().cpu().eval()
    copied.features = None
    copied.prepare_for_inference()
    if kind == "waveglow":
        for k, invconv in enumerate(copied.invconvs):
            copied.invconvs[k] = _FixedInverse(invconv.inverse_kernel(torch.float32,
                                                                      torch.device("cpu")))
    graph = _SynthesisGraph(copied, sigma).eval()
    mel = torch.zeros(2, model.n_mels, example_frames)
    z = torch.zeros(2, example_frames * model.hop_length)
    batch, frames = torch.export.Dim("batch"), torch.export.Dim("frames", min=2)
    dynamic = {"mel": {0: batch, 2: frames},
               "z": {0: batch, 1: frames * model.hop_length}}
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(graph, (mel, z), input_names=["mel", "z"],
                                    output_names=["audio"], dynamic_shapes=dynamic,
                                    opset_version=int(opset), dynamo=True, verbose=False,
                                    optimize=False)
    meta = {"kind": kind, "n_mels": model.n_mels, "hop_length": model.hop_length,
            "sigma": sigma, "arch": model.arch_config(),
            "features": features.config.to_dict() if features is not None else None}
    program.model.metadata_props[_META_KEY] = json.dumps(meta)
    path = Path(path)
    with atomic_path(path) as tmp:
        program.save(tmp)
    return path


class OnnxVocoder:
    """An exported graph run by onnxruntime, with the synthesis call of the PyTorch models:
    ``synthesize(mel [B, n_mels, F], sigma=None, z=None) -> audio [B, F * hop]`` (torch
    tensors in and out). ``sigma`` was fixed at export: passing another value is an error.
    Attributes ``kind``, ``n_mels``, ``hop_length``, ``sigma`` and ``features`` (the mel front
    end, when the export recorded one)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 optimization: str = "all"):
        ort = _require("onnxruntime", "running an ONNX graph")
        path = Path(path)
        if not path.is_file():
            raise VocoderError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        levels = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if optimization not in levels:
            raise VocoderError(f"unknown onnxruntime optimisation level {optimization!r} "
                               f"(known: {', '.join(levels)})")
        options.graph_optimization_level = levels[optimization]
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise VocoderError(f"{path}: not a loadable ONNX graph ({e})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get(_META_KEY)
        if raw is None:
            raise VocoderError(f"{path}: not exported by vocoder-export (no '{_META_KEY}' "
                               f"metadata)")
        meta = json.loads(raw)
        self.path = path
        self.kind = meta["kind"]
        self.n_mels = int(meta["n_mels"])
        self.hop_length = int(meta["hop_length"])
        self.sigma = float(meta["sigma"])
        self.features = None
        if meta.get("features"):
            from vocoder.features import MelFrontEnd

            self.features = MelFrontEnd.from_dict(meta["features"])

    def synthesize(self, mel: Tensor, sigma: float | None = None,
                   z: Tensor | None = None) -> Tensor:
        if sigma is not None and abs(float(sigma) - self.sigma) > 1e-6:
            raise VocoderError(f"{self.path}: exported with sigma={self.sigma:g}; re-export "
                               f"for sigma={float(sigma):g}")
        if mel.dim() != 3 or mel.shape[1] != self.n_mels:
            raise ValueError(f"mel must be [B, {self.n_mels}, F], got {tuple(mel.shape)}")
        shape = (mel.shape[0], mel.shape[-1] * self.hop_length)
        if z is None:
            z = torch.randn(shape)
        elif tuple(z.shape) != shape:
            raise ValueError(f"z must be {list(shape)} for this mel, got {list(z.shape)}")
        feeds = {"mel": mel.detach().float().cpu().contiguous().numpy(),
                 "z": z.detach().float().cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run(["audio"], feeds)[0])
