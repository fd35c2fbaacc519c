"""Triton kernels against the dense fp32 torch reference: every output and every gradient.
On CPU they run in the Triton interpreter (TRITON_INTERPRET=1, set in conftest; small fp32 shapes);
on CUDA compiled, plus a bf16 check."""

import pytest
import torch

pytest.importorskip("triton")

import kernels  # noqa: E402
from kernels.reference import decode_dense, to_padded  # noqa: E402
from kernels.triton_decode import decode_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sparse_acts(n, L, F, k, ragged=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, L, F, generator=g)
    if ragged:  # BatchTopK-like: k·n largest per layer over the batch, ragged per token
        flat = h.transpose(0, 1).reshape(L, -1)
        thr = flat.topk(k * n, dim=-1).values[:, -1]
        a = h * (h >= thr[None, :, None])
    else:
        vals, idx = h.topk(k, dim=-1)
        a = torch.zeros_like(h).scatter(-1, idx, vals.abs() + 0.1)
    a[0] = 0  # a token with no active feature
    a[:, :, F // 2] = 0.5  # a feature active on every token
    return a


def check_decode(a, W0, dtype=torch.float32, rtol=1e-4, atol=1e-4):
    g = torch.randn(a.shape[0], a.shape[1], W0[0].shape[-1])
    support = a != 0
    out = {}
    for name in ("ref", "triton"):
        aa = a.clone().to(DEVICE, dtype).requires_grad_(True)
        W = [w.clone().to(DEVICE, dtype).requires_grad_(True) for w in W0]
        if name == "ref":
            aa64 = aa.double()
            y = decode_dense(aa64, [w.double() for w in W])
        else:
            y = decode_triton(*to_padded(aa), W)
        (y.float() * g.to(DEVICE)).sum().backward()
        out[name] = (y.float().cpu(), (aa.grad.float() * support.to(DEVICE)).cpu(), [w.grad.float().cpu() for w in W])
    torch.testing.assert_close(out["triton"][0], out["ref"][0], rtol=rtol, atol=atol)
    torch.testing.assert_close(out["triton"][1], out["ref"][1], rtol=rtol, atol=atol)
    for gt, gr in zip(out["triton"][2], out["ref"][2]):
        torch.testing.assert_close(gt, gr, rtol=rtol, atol=atol)


@pytest.mark.parametrize("L,d,F,k,ragged", [
    (1, 24, 37, 3, False),  # L = 1
    (3, 20, 37, 5, False),  # non-power-of-two d, F, k
    (4, 70, 50, 17, False),  # d > one block, K > one block
    (3, 16, 29, 4, True),  # BatchTopK: ragged rows, padded
])
def test_sparse_decode_matches_dense_reference(L, d, F, k, ragged):
    a = sparse_acts(11, L, F, k, ragged)
    W0 = [torch.randn(F, L - s, d) for s in range(L)]
    check_decode(a, W0)


def test_decode_is_deterministic():
    a = sparse_acts(16, 3, 40, 6).to(DEVICE)
    W = [torch.randn(40, 3 - s, 24, device=DEVICE) for s in range(3)]
    y1, y2 = decode_triton(*to_padded(a), W), decode_triton(*to_padded(a), W)
    assert torch.equal(y1, y2)


def test_jumprelu_band_positions_get_gradient():
    """Inactive positions on the support (JumpReLU's θ band) get the dense gradient, value 0."""
    a = sparse_acts(9, 2, 23, 3)
    support = (a != 0) | (torch.rand(a.shape, generator=torch.Generator().manual_seed(1)) < 0.2)
    W0 = [torch.randn(23, 2 - s, 12) for s in range(2)]
    g = torch.randn(9, 2, 12)
    grads = []
    for path in ("dense", "triton"):
        aa = a.clone().to(DEVICE).requires_grad_(True)
        y = kernels.decode(aa, [w.to(DEVICE) for w in W0], support.to(DEVICE), impl=path)
        (y * g.to(DEVICE)).sum().backward()
        grads.append((aa.grad * support.to(DEVICE)).cpu())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_decode_bf16_on_gpu():
    a = sparse_acts(64, 4, 96, 8)
    W0 = [torch.randn(96, 4 - s, 64) * 0.1 for s in range(4)]
    check_decode(a, W0, dtype=torch.bfloat16, rtol=1e-2, atol=1e-2)


def test_choose_paths(monkeypatch):
    a = torch.zeros(4, 2, 100)
    a[:, :, 0] = 1
    monkeypatch.delenv("CLT_KERNELS", raising=False)
    assert kernels.choose(a) == ("triton" if a.is_cuda else "sparse")
    assert kernels.choose(torch.ones(4, 2, 10)) == "dense"
    monkeypatch.setenv("CLT_KERNELS", "triton")
    assert kernels.choose(a) == "triton"
    assert kernels.choose(a, "dense") == "dense"
    with pytest.raises(ValueError, match="expected one of"):
        kernels.choose(a, "cuda")


SLOW_ON_CPU = pytest.mark.slow if DEVICE == "cpu" else []


@pytest.mark.parametrize("activation,steps,batch", [
    ("topk", 100, 16), ("jumprelu", 100, 16),
    pytest.param("topk", 300, 32, marks=SLOW_ON_CPU), pytest.param("jumprelu", 300, 32, marks=SLOW_ON_CPU),
])
def test_training_curve_matches_reference(activation, steps, batch):
    """Hundreds of Adam steps with the Triton decode and with the torch reference give the same
    loss curve to within fp32 noise (the interpreter is slow: 300-step runs are `slow` on CPU)."""
    from clt.config import TrainConfig
    from clt.model import CLTArchitecture
    from clt.training import CLTModule

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(2, 16, 16, generator=g)
    x = torch.randn(512, 2, 16, generator=g)
    y = torch.einsum("nld,lde->nle", x, mix).relu()  # a learnable target
    curves = {}
    for impl in ("sparse", "triton"):
        cfg = TrainConfig()
        cfg.clt.activation, cfg.clt.d_sae, cfg.clt.k = activation, 24, 3
        cfg.clt.sparsity_coeff, cfg.trainer.max_steps = 1e-3, steps
        torch.manual_seed(0)
        m = CLTModule(cfg, CLTArchitecture(n_layers=2, d_model=16, d_sae=24, activation=activation, k=3,
                                           decode=impl)).to(DEVICE)
        m.initialize_from_data(x[:256].to(DEVICE), y[:256].to(DEVICE))
        opt = torch.optim.Adam(m.clt.parameters(), lr=3e-3)
        losses = []
        for step in range(steps):
            b = slice((step % 16) * batch, (step % 16 + 1) * batch)
            loss, _ = m.loss(x[b].to(DEVICE), y[b].to(DEVICE))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[impl] = torch.tensor(losses)
    assert curves["sparse"][-20:].mean() < 0.7 * curves["sparse"][:20].mean()  # it did learn
    torch.testing.assert_close(curves["triton"], curves["sparse"], rtol=1e-3, atol=1e-5)
