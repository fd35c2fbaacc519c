"""JumpReLU trained from its entries (clt/kernels/jumprelu.py): the pre-activations, the
activations, the tanh sparsity and pre-activation losses, and every gradient equal the dense fp32
reference (sparsity._JumpReLU, loss.tanh_sparsity, loss.preactivation, the dense decode), on the C
kernel and on the torch path."""

import pytest
import torch

from clt import sparsity as act
from clt.kernels import cpu, decode
from clt.kernels.jumprelu import jumprelu_encode, scan
from clt.kernels.reference import decode_dense
from clt.loss import preactivation, tanh_sparsity
from clt.model import CLTArchitecture, CrossLayerTranscoder

N, L, D, F = 40, 3, 8, 24


def clt_and_input(log_threshold: bool, seed: int = 0):
    torch.manual_seed(seed)
    arch = CLTArchitecture(
        n_layers=L, d_model=D, d_sae=F, activation="jumprelu", bandwidth=0.5, log_threshold=log_threshold
    )
    clt = CrossLayerTranscoder(arch, threshold_init=0.3)
    x = torch.randn(N, L, D)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.3)
        clt.threshold_param.copy_(0.2 + 0.4 * torch.rand(L, F))
        if log_threshold:
            clt.threshold_param.log_()
        # tokens 0-1 read nothing (h = b_enc), and θ = b_enc on some features: h = θ exactly there
        x[:2] = 0
        on = clt.b_enc > 0.05
        theta = torch.where(on, clt.b_enc, clt.threshold)
        clt.threshold_param.copy_(theta.log() if log_threshold else theta)
    return clt, x.requires_grad_()


def losses(clt, x, fused: bool, ste: bool, probe: torch.Tensor):
    """A loss reading every output: a random functional of the reconstruction, S and P."""
    xs = x * clt.input_scale[:, None]
    norms = clt.decoder_norms()
    if fused:
        h, a, S, P = jumprelu_encode(xs, clt.W_enc, clt.b_enc, clt.threshold, norms, 0.5, ste, 4.0)
        y = decode(a, list(clt.W_dec), impl="sparse")
        dense_a = a.dense()
    else:
        h = torch.einsum("nld,lfd->nlf", xs, clt.W_enc) + clt.b_enc
        dense_a = act.jumprelu(h, clt.threshold, 0.5, ste)
        y = decode_dense(dense_a, list(clt.W_dec))
        S, P = tanh_sparsity(dense_a, norms, 4.0), preactivation(h, clt.threshold, norms)
    total = (y * probe).sum() + 0.7 * S + 0.3 * P
    return total, h.detach(), dense_a.detach(), S.detach(), P.detach()


@pytest.mark.parametrize("kernel", [True, False], ids=["c-kernel", "torch"])
@pytest.mark.parametrize("ste", [False, True], ids=["ste-off", "ste-on"])
@pytest.mark.parametrize("log_threshold", [False, True], ids=["theta", "log-theta"])
def test_entries_path_equals_the_dense_reference(kernel, ste, log_threshold, monkeypatch):
    if kernel:
        assert cpu.library() is not None
    else:
        monkeypatch.setattr(cpu, "usable", lambda *tensors: False)
    probe = torch.randn(N, L, D)
    out = {}
    for fused in (True, False):
        clt, x = clt_and_input(log_threshold)
        total, h, a, S, P = losses(clt, x, fused, ste, probe)
        total.backward()
        grads = {k: p.grad.clone() for k, p in clt.named_parameters() if k != "b_dec"}  # (not read)
        grads["x"] = x.grad.clone()
        out[fused] = (total.detach(), h, a, S, P, grads)
    got, want = out[True], out[False]
    band = ((want[1] - clt.threshold.detach()).abs() < 0.25) & (want[2] == 0)
    assert band.sum() > 20 and (want[2] > 0).sum() > 20  # both kinds of entry occur
    assert (want[1] == clt.threshold.detach()).any()  # and h = θ exactly
    for name, g, w in zip(("total", "h", "a", "S", "P"), got[:5], want[:5]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
    for k, w in want[5].items():
        assert w.abs().sum() > 0, k
        torch.testing.assert_close(got[5][k], w, rtol=1e-4, atol=1e-5, msg=k)


def test_the_scan_kernel_equals_the_torch_scan(monkeypatch):
    torch.manual_seed(3)
    h = torch.randn(L, 300, F).transpose(0, 1)  # layer-major, as the encoder writes it
    theta = 0.5 + torch.rand(L, F)
    h[5, 1, :4] = theta[1, :4]  # h = θ
    lo = theta - 0.2
    c = cpu.jumprelu_scan(h, theta, lo)
    monkeypatch.setattr(cpu, "usable", lambda *tensors: False)
    t = scan(h, theta, lo)  # the torch scan (what runs without the kernel)
    for name, a, b in zip(("rows", "cols", "hv", "counts"), c[:4], t[:4]):
        assert torch.equal(a, b), name
    torch.testing.assert_close(c[4], t[4])  # R: summed in double by the kernel
    assert torch.equal(c[5], t[5])
    assert int(c[3].sum()) == int((h > lo).sum())


def test_sparse_activations_stand_for_the_dense_ones():
    clt, x = clt_and_input(False)
    with torch.no_grad():
        xs = x * clt.input_scale[:, None]
        h, a, _, _ = jumprelu_encode(
            xs, clt.W_enc, clt.b_enc, clt.threshold, clt.decoder_norms(), 0.5, False, 4.0
        )
        dense = act.jumprelu(h, clt.threshold, 0.5)
    assert torch.equal(a.dense(), dense)
    assert torch.equal(a.support(), h > clt.threshold - 0.25)
    assert torch.equal(a.fired(), (dense != 0).any(0))
    torch.testing.assert_close(a.l0(), (dense != 0).sum(-1).float().mean(0))
    assert (a.vals == 0).any()  # band entries below θ are entries too
