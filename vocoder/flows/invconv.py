"""Invertible 1x1 convolutions: a learned linear mix of channels, the same at every time step.

Two parameterisations share one interface:

* :class:`InvConv1x1` stores the matrix ``W`` itself (WaveGlow); ``log|det W|`` comes from
  ``slogdet``.
* :class:`InvConv1x1LU` stores ``W = P L (U + diag(sign(s) * exp(log|s|)))`` (Glow), with ``P``
  a fixed permutation, ``L`` unit lower triangular and ``U`` strictly upper triangular, so
  ``log|det W| = sum(log|s|)`` costs nothing and ``W`` stays invertible.

``forward(x [B, C, T]) -> (y, log_det [B])`` with ``log_det = T * log|det W|`` (nats), and
``inverse(y) -> x``. The inverse matrix is computed in float64, cast to the input's dtype and
cached; the cache is keyed on the parameters' version counters and storage, so an optimiser
step, ``load_state_dict`` or ``.to()`` invalidates it, and ``train(True)`` drops it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def random_rotation(channels: int, generator: torch.Generator | None = None) -> Tensor:
    """A random orthogonal ``[C, C]`` matrix with determinant +1 (float32)."""
    gaussian = torch.randn(channels, channels, generator=generator, dtype=torch.float64)
    q = torch.linalg.qr(gaussian)[0]
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.float()


def _log_det_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-determinants are summed in at least float32, even for half-precision activations."""
    return torch.promote_types(dtype, torch.float32)


class _InvertibleConv(nn.Module):
    """Shared machinery; subclasses define :meth:`weight_matrix` and :meth:`log_abs_det`."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self._cache: dict = {}

    def weight_matrix(self) -> Tensor:
        """``W`` as ``[C, C]`` (differentiable)."""
        raise NotImplementedError

    def log_abs_det(self) -> Tensor:
        """``log|det W|`` as a float64 scalar (differentiable)."""
        raise NotImplementedError

    def _sources(self) -> list[Tensor]:
        return [*self.parameters(), *self.buffers()]

    def _needs_graph(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def _kernel(self, name: str, dtype: torch.dtype, device: torch.device, compute) -> Tensor:
        """``compute()`` as a ``[C, C, 1]`` kernel in ``dtype``: cached unless autograd needs
        it, or computed in the graph under torch.compile (a cache keyed on data pointers
        would break the graph at every flow; a C x C inverse per call costs nothing)."""
        if self._needs_graph() or torch.compiler.is_compiling():
            return compute().to(dtype).unsqueeze(-1)
        return self._cached_kernel(name, dtype, device, compute)

    def _cached_kernel(self, name: str, dtype: torch.dtype, device: torch.device,
                       compute) -> Tensor:
        key = (dtype, device, tuple((p._version, p.data_ptr()) for p in self._sources()))
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                kernel = compute().to(device=device, dtype=dtype).unsqueeze(-1).contiguous()
            hit = self._cache[name] = (key, kernel)
        return hit[1]

    def forward_kernel(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``W`` as a conv1d kernel ``[C, C, 1]``."""
        return self._kernel("forward", dtype, device, self.weight_matrix)

    def inverse_kernel(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``W^-1`` as a conv1d kernel ``[C, C, 1]``, inverted in float64 then cast."""
        return self._kernel(
            "inverse", dtype, device, lambda: torch.linalg.inv(self.weight_matrix().double())
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, C, T]`` -> ``(W x, log_det [B])``."""
        y = F.conv1d(x, self.forward_kernel(x.dtype, x.device))
        log_det = (x.shape[-1] * self.log_abs_det()).to(_log_det_dtype(x.dtype))
        return y, log_det.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        """``y [B, C, T]`` -> ``W^-1 y``."""
        return F.conv1d(y, self.inverse_kernel(y.dtype, y.device))

    def prepare_for_inference(self, dtype: torch.dtype | None = None) -> None:
        """Compute and cache the inverse for the current device and ``dtype``."""
        ref = next(iter(self.parameters()))
        with torch.no_grad():
            self.inverse_kernel(dtype or ref.dtype, ref.device)

    def train(self, mode: bool = True):
        if mode:
            self._cache.clear()
        return super().train(mode)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class InvConv1x1(_InvertibleConv):
    """Plain parameterisation: ``weight [C, C]`` is ``W``, initialised as a random rotation."""

    def __init__(self, channels: int):
        super().__init__(channels)
        self.weight = nn.Parameter(random_rotation(channels))

    def weight_matrix(self) -> Tensor:
        return self.weight

    def log_abs_det(self) -> Tensor:
        return torch.linalg.slogdet(self.weight.double())[1]


class InvConv1x1LU(_InvertibleConv):
    """LU parameterisation (Glow), initialised from a random rotation.

    Parameters ``lower`` and ``upper`` are read through their strict triangles only; buffers
    ``perm`` (``P``) and ``sign_s`` stay fixed.
    """

    def __init__(self, channels: int):
        super().__init__(channels)
        p, l, u = torch.linalg.lu(random_rotation(channels).double())
        s = torch.diagonal(u)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.lower = nn.Parameter(torch.tril(l, -1).float())
        self.upper = nn.Parameter(torch.triu(u, 1).float())
        self.log_abs_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def weight_matrix(self) -> Tensor:
        # Assembled in at least float32 so half-precision models keep an accurate W.
        dtype = _log_det_dtype(self.lower.dtype)
        eye = torch.eye(self.channels, dtype=dtype, device=self.lower.device)
        lower = torch.tril(self.lower.to(dtype), -1) + eye
        diag = self.sign_s.to(dtype) * torch.exp(self.log_abs_s.to(dtype))
        upper = torch.triu(self.upper.to(dtype), 1) + torch.diag(diag)
        return self.perm.to(dtype) @ lower @ upper

    def log_abs_det(self) -> Tensor:
        return self.log_abs_s.double().sum()


INVCONVS = {"plain": InvConv1x1, "lu": InvConv1x1LU}


def make_invconv(kind: str, channels: int) -> _InvertibleConv:
    """``"plain"`` or ``"lu"`` 1x1 convolution over ``channels``."""
    if kind not in INVCONVS:
        raise ValueError(f"unknown invconv {kind!r}; known: {', '.join(INVCONVS)}")
    return INVCONVS[kind](channels)
