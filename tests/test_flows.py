"""Flow building blocks: exact inverses and log-determinants against autograd's Jacobian."""

import pytest
import torch
from torch.autograd.functional import jacobian

from vocoder.flows.coupling import AffineCoupling
from vocoder.flows.invconv import make_invconv
from vocoder.nn import wn as wn_module
from vocoder.nn.wn import WN


@pytest.mark.parametrize("kind", ["plain", "lu"])
def test_invconv_inverse_and_log_det(kind):
    conv = make_invconv(kind, 6).double()
    with torch.no_grad():  # move away from the rotation it starts as, so |det| != 1
        for p in conv.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    y, log_det = conv(x)
    assert torch.allclose(conv.inverse(y), x, atol=1e-12)
    w = conv.weight_matrix()
    expected = 5 * torch.linalg.slogdet(w)[1]
    assert torch.allclose(log_det, expected.expand(2), atol=1e-10)
    assert abs(expected.item()) > 0.01
    assert torch.allclose(y, torch.einsum("ij,bjt->bit", w, x), atol=1e-12)


@pytest.mark.parametrize("kind", ["plain", "lu"])
def test_invconv_starts_as_rotation(kind):
    w = make_invconv(kind, 8).weight_matrix().detach().double()
    assert torch.allclose(w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-5)
    assert torch.linalg.det(w).item() == pytest.approx(1.0, abs=1e-5)


def test_invconv_inverse_cache_follows_weight_updates():
    conv = make_invconv("plain", 4).eval()
    y = torch.randn(1, 4, 3)
    with torch.no_grad():
        first = conv.inverse(y)
        conv.weight.mul_(2.0)  # an in-place update, like an optimiser step
        assert torch.allclose(conv.inverse(y), first / 2, atol=1e-6)
        half = conv.inverse(y.half())
    assert half.dtype == torch.float16


def test_invconv_gradient_reaches_weights():
    conv = make_invconv("lu", 4)
    y, log_det = conv(torch.randn(2, 4, 3))
    (y.square().sum() + log_det.sum()).backward()
    assert all(p.grad is not None for p in conv.parameters())


def _random_end(net: WN, std: float = 0.3) -> None:
    # The end conv starts at zero (identity coupling); randomise it or every test is trivial.
    torch.nn.init.normal_(net.end.weight, std=std)
    torch.nn.init.normal_(net.end.bias, std=std)


@pytest.mark.parametrize("weight_norm", [True, False])
def test_coupling_inverse_and_log_det(weight_norm):
    coupling = AffineCoupling(4, 3, n_layers=2, n_channels=8, weight_norm=weight_norm).double()
    _random_end(coupling.net)
    cond = torch.randn(1, 3, 6, dtype=torch.float64)
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    y, log_det = coupling(x, cond)
    assert torch.allclose(y[:, :2], x[:, :2])
    assert torch.allclose(coupling.inverse(y, cond), x, atol=1e-12)
    jac = jacobian(lambda v: coupling(v.view(1, 4, 6), cond)[0].flatten(), x.flatten())
    assert torch.allclose(log_det[0], torch.linalg.slogdet(jac)[1], atol=1e-10)
    assert abs(log_det.item()) > 0.01


def test_fresh_coupling_is_identity():
    coupling = AffineCoupling(4, 3, n_layers=2, n_channels=8)
    x = torch.randn(2, 4, 5)
    y, log_det = coupling(x, torch.randn(2, 3, 5))
    assert torch.equal(y, x) and torch.equal(log_det, torch.zeros(2))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("block", [None, 1, 4])
def test_wn_fused_inference_form_matches(batch, block, monkeypatch):
    # One block for all time steps, blocks of one step, and blocks of four with a shorter last
    # one; the taps reach past either end of the signal (dilation 4, kernel 5). The fused
    # layers through batched convolutions (the path on CUDA and under torch.compile) too.
    monkeypatch.setattr(wn_module, "CPU_BLOCK_COLUMNS", block)
    net = WN(2, 3, n_layers=3, n_channels=8, kernel_size=5).double()
    _random_end(net)
    x, cond = torch.randn(batch, 2, 13, dtype=torch.float64), torch.randn(batch, 3, 13).double()
    with torch.no_grad():
        before = net(x, cond)
        net.fuse_for_inference()
        net.fuse_for_inference()
        after = net(x, cond)  # the GEMM path
        convolved = net._forward_conv(x, cond)
    assert torch.allclose(after, before, atol=1e-12)
    assert torch.allclose(convolved, before, atol=1e-12)
    assert torch.allclose(net(x, cond), before, atol=1e-12)  # the conv path, with autograd
