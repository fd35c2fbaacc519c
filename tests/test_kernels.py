"""Triton kernels against the dense fp32 torch reference: every output and every gradient.
On CPU they run in the Triton interpreter (TRITON_INTERPRET=1, set in conftest; small fp32 shapes);
on CUDA compiled, plus a bf16 check."""

import pytest
import torch

pytest.importorskip("triton")

from clt import kernels  # noqa: E402
from clt.kernels.reference import decode_dense, to_padded  # noqa: E402
from clt.kernels.triton_decode import decode_triton  # noqa: E402

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
    # the upstream gradient reaches the kernel in `dtype`: make it exactly representable there, so that
    # both paths see the same numbers and only the kernel's arithmetic is compared
    g = torch.randn(a.shape[0], a.shape[1], W0[0].shape[-1]).to(dtype).float()
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
        out[name] = (
            y.float().cpu(),
            (aa.grad.float() * support.to(DEVICE)).cpu(),
            [w.grad.float().cpu() for w in W],
        )
    torch.testing.assert_close(out["triton"][0], out["ref"][0], rtol=rtol, atol=atol)
    torch.testing.assert_close(out["triton"][1], out["ref"][1], rtol=rtol, atol=atol)
    for gt, gr in zip(out["triton"][2], out["ref"][2]):
        torch.testing.assert_close(gt, gr, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "L,d,F,k,ragged",
    [
        (1, 24, 37, 3, False),  # L = 1
        (3, 20, 37, 5, False),  # non-power-of-two d, F, k
        (4, 70, 50, 17, False),  # d > one block, K > one block
        (3, 16, 29, 4, True),  # BatchTopK: ragged rows, padded
    ],
)
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
    a = torch.zeros(4, 2, 100, device=DEVICE)
    a[:, :, 0] = 1
    monkeypatch.delenv("CLT_KERNELS", raising=False)
    assert kernels.choose(a) == ("triton" if a.is_cuda else "sparse")
    assert kernels.choose(torch.ones(4, 2, 10)) == "dense"  # CPU, dense activations
    monkeypatch.setenv("CLT_KERNELS", "triton")
    assert kernels.choose(a) == "triton"
    assert kernels.choose(a, "dense") == "dense"
    with pytest.raises(ValueError, match="expected one of"):
        kernels.choose(a, "cuda")


SLOW_ON_CPU = pytest.mark.slow if DEVICE == "cpu" else []


@pytest.mark.parametrize(
    "activation,steps,batch",
    [
        ("topk", 100, 16),
        pytest.param("jumprelu", 100, 16, marks=SLOW_ON_CPU),  # (its encode/decode: the fused tests)
        pytest.param("topk", 300, 32, marks=SLOW_ON_CPU),
        pytest.param("jumprelu", 300, 32, marks=SLOW_ON_CPU),
    ],
)
def test_training_curve_matches_reference(activation, steps, batch):
    """Hundreds of Adam steps with the Triton decode and with the torch reference give the same
    loss curve to within fp32 noise (the interpreter is slow: on CPU only TopK's 100 steps run
    outside `-m slow`)."""
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
        cfg.clt.sparsity_coeff, cfg.trainer.max_steps, cfg.clt.decode = 1e-3, steps, impl
        torch.manual_seed(0)
        m = CLTModule(cfg, CLTArchitecture(n_layers=2, d_model=16, d_sae=24, activation=activation, k=3)).to(
            DEVICE
        )
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
    # step by step for 100 steps; beyond, last-bit differences in summation order (which differ on a
    # GPU) flip TopK selections and the two trajectories drift apart like any two fp32 runs: there
    # the late-phase mean loss must agree
    n = min(steps, 100)
    torch.testing.assert_close(curves["triton"][:n], curves["sparse"][:n], rtol=1e-3, atol=1e-5)
    late_t, late_s = curves["triton"][-50:].mean(), curves["sparse"][-50:].mean()
    assert abs(late_t - late_s) <= 0.02 * late_s, (late_t, late_s)


@pytest.mark.parametrize(
    "activation,ste", [("jumprelu", False), ("jumprelu", True), ("relu", False), ("none", False)]
)
def test_fused_encode_matches_reference(activation, ste):
    from clt.kernels.triton_encode import encode_triton
    from clt.sparsity import jumprelu

    g = torch.Generator().manual_seed(0)
    n, L, d, F = 37, 3, 40, 45  # non-powers of two, more than one block each way
    x0 = torch.randn(n, L, d, generator=g)
    W0, b0 = torch.randn(L, F, d, generator=g) / d**0.5, torch.randn(L, F, generator=g) * 0.1
    th0 = torch.rand(L, F, generator=g) * 0.5 + 0.2
    gh, ga = torch.randn(n, L, F, generator=g), torch.randn(n, L, F, generator=g)
    results = []
    for path in ("ref", "triton"):
        x, W, b, th = (t.clone().to(DEVICE).requires_grad_(True) for t in (x0, W0, b0, th0))
        if path == "ref":
            h = torch.einsum("nld,lfd->nlf", x, W) + b
            if activation == "jumprelu":
                a = jumprelu(h, th, 1.0, ste)
            else:
                a = h.relu() if activation == "relu" else h
        else:
            h, a = encode_triton(x, W, b, th if activation == "jumprelu" else None, activation, 1.0, ste)
        ((h * gh.to(DEVICE)).sum() + (a * ga.to(DEVICE)).sum()).backward()
        results.append([h, a, x.grad, W.grad, b.grad, th.grad])
    for name, r, t in zip(["h", "a", "x", "W", "b", "θ"], *results):
        if r is None:
            assert t is None or not t.abs().any(), name
            continue
        torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-4, msg=name)
    if activation == "jumprelu":
        assert results[0][5].abs().sum() > 0  # the θ band is exercised


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
def test_module_loss_gradients_triton_vs_dense(activation):
    """The whole training loss through the Triton path (fused encode + sparse decode) gives the
    dense reference's loss and every parameter gradient."""
    from clt.config import TrainConfig
    from clt.model import CLTArchitecture
    from clt.training import CLTModule

    def module(impl, shift=0.0):
        cfg = TrainConfig()
        cfg.clt.activation, cfg.clt.d_sae, cfg.clt.k = activation, 33, 4
        cfg.clt.sparsity_coeff, cfg.clt.sparsity_warmup_frac, cfg.clt.dead_after_tokens = 0.1, 0.0, 40
        cfg.clt.decode = impl
        torch.manual_seed(0)
        m = CLTModule(
            cfg, CLTArchitecture(n_layers=3, d_model=24, d_sae=33, activation=activation, k=4, bandwidth=2.0)
        ).to(DEVICE)
        m.initialize_from_data(x.to(DEVICE), y.to(DEVICE))
        with torch.no_grad():
            m.clt.b_enc.add_(shift)
        return m

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 24, generator=g), torch.randn(40, 3, 24, generator=g)
    # JumpReLU's initialisation puts thresholds exactly at pre-activation values; there the fused and
    # dense GEMMs (other summation orders) fire differently, a tie and not a bug: shift every
    # pre-activation (the same for both paths) until none is within 1e-4 of its threshold
    shift = 0.0
    if activation == "jumprelu":
        for shift in [i * 1e-3 for i in range(1, 50)]:
            m = module("dense", shift)
            with torch.no_grad():
                margin = (m.clt.encode(x.to(DEVICE)) - m.clt.threshold).abs().min().item()
            if margin > 1e-4:
                break
        assert margin > 1e-4
    out = {}
    for impl in ("dense", "triton"):
        m = module(impl, shift)
        m.loss(x.to(DEVICE), y.to(DEVICE))  # step 1 marks dead features: AuxK runs on step 2
        total, logs = m.loss(x.to(DEVICE), y.to(DEVICE))
        total.backward()
        out[impl] = (total.item(), {k: p.grad.clone().cpu() for k, p in m.clt.named_parameters()}, logs)
    assert out["triton"][0] == pytest.approx(out["dense"][0], rel=1e-5)
    for k, gd in out["dense"][1].items():
        torch.testing.assert_close(out["triton"][1][k], gd, rtol=1e-4, atol=1e-5, msg=k)


def test_kernel_benchmark_runs():
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "kernels.py"),
            "--quick",
            "--reps",
            "1",
            "--no-step",
            "--out",
            "/dev/null",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "decode  sparse" in out.stdout and "×dense" in out.stdout


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="need a CUDA device; on CPU set TRITON_INTERPRET=1"):
        kernels.use_triton(torch.zeros(2, 2, 2), "triton")


@pytest.mark.parametrize("ragged", [False, True])
def test_encoder_weight_grad_kernel_matches_dense(ragged):
    """The encoder's weight gradient from the non-zero ∂h (TopK/BatchTopK's pairs) in Triton against
    the dense einsum; rows no token touched come out 0 (the output is not zero-filled first)."""
    from clt.kernels.triton_encode import encoder_weight_grad_triton

    dh = sparse_acts(24, 3, 40, 3, ragged=ragged).to(DEVICE) * torch.randn(24, 3, 40, device=DEVICE)
    dh[:, :, 5] = 0  # a feature no token touches
    x = torch.randn(24, 3, 16, device=DEVICE)
    got = encoder_weight_grad_triton(dh, x)
    torch.testing.assert_close(got, torch.einsum("nlf,nld->lfd", dh, x), rtol=1e-5, atol=1e-5)
    assert (got[:, 5] == 0).all()
    assert torch.equal(encoder_weight_grad_triton(dh, x), got)  # deterministic


def test_value_gradient_alone_with_frozen_decoder():
    """∂val without ∂W_dec (a frozen decoder: the token-major kernel) equals the fused pass's ∂val
    and the dense reference's."""
    a = sparse_acts(20, 3, 37, 4, ragged=True)
    W = [(torch.randn(37, 3 - s, 40) * 0.1).to(DEVICE) for s in range(3)]
    g = torch.randn(20, 3, 40, device=DEVICE)
    grads = []
    for frozen in (True, False):
        Ws = [w.clone().requires_grad_(not frozen) for w in W]
        aa = a.clone().to(DEVICE).requires_grad_(True)
        (decode_triton(*to_padded(aa), Ws) * g).sum().backward()
        grads.append(aa.grad * (a != 0).to(DEVICE))
    aa = a.clone().double().requires_grad_(True)
    (decode_dense(aa, [w.double() for w in W]) * g.double()).sum().backward()
    for got in grads:
        torch.testing.assert_close(got, (aa.grad * (a != 0)).float(), rtol=1e-4, atol=1e-5)


def test_encoder_weight_grad_from_entries_with_a_constant():
    """JumpReLU's form: a constant ∂h per (layer, feature) at every token plus the entries."""
    from clt.kernels.triton_encode import weight_grad_entries_triton

    n, L, F, d = 18, 3, 11, 20
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, L, d, generator=g).to(DEVICE)
    dh = torch.zeros(n, L, F).to(DEVICE)
    sel = torch.rand(n, L, F, generator=g).to(DEVICE) < 0.2
    dh[sel] = torch.randn(int(sel.sum()), generator=g).to(DEVICE)
    const = torch.randn(L, F, generator=g).to(DEVICE)
    tok, lay, feat = sel.nonzero(as_tuple=True)
    got = weight_grad_entries_triton(x, tok, lay, feat, dh[tok, lay, feat], F, const=const)
    want = torch.einsum("nlf,nld->lfd", dh + const, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
