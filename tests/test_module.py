"""The Lightning module's loss outside Lightning: AuxK on dead features, JumpReLU terms, and the
data-dependent initialisation."""

import math

import pytest
import torch

from clt.config import TrainConfig
from clt.kernels import cpu
from clt.model import CLTArchitecture
from clt.training import CLTModule


def module(activation="topk", F=32, k=2, **clt_kw):
    cfg = TrainConfig()
    cfg.clt.activation, cfg.clt.d_sae, cfg.clt.k = activation, F, k
    for key, v in clt_kw.items():
        setattr(cfg.clt, key, v)
    torch.manual_seed(0)
    return CLTModule(cfg, CLTArchitecture(n_layers=3, d_model=8, d_sae=F, activation=activation, k=k))


def data(n=64):
    torch.manual_seed(1)
    return torch.randn(n, 3, 8) * 3, torch.randn(n, 3, 8) * 5


def test_initialisation_from_data():
    m = module()
    x, y = data()
    m.initialize_from_data(x, y)
    xn = (x * m.clt.input_scale[:, None]).norm(dim=-1).mean(0)
    torch.testing.assert_close(xn, torch.full((3,), math.sqrt(8)))  # E‖x̃‖ = √d per layer
    torch.testing.assert_close(m.clt.b_dec, (y * m.clt.output_scale[:, None]).mean(0))


def test_jumprelu_bias_init_hits_firing_rate():
    m = module("jumprelu", F=16, init_firing_rate=0.25)
    x, y = data(400)
    m.initialize_from_data(x, y)
    rate = (m.clt.activate(m.clt.encode(x)) != 0).float().mean()
    assert abs(rate.item() - 0.25) < 0.02


def test_auxk_trains_dead_features():
    m = module(dead_after_tokens=64)
    x, y = data()
    m.initialize_from_data(x, y)
    _, logs = m.loss(x, y)  # first step: counters move to 64 tokens; unfired features become dead
    assert logs["losses/auxk"] == 0
    dead = m.tokens_since_fired >= 64
    assert dead.any() and not dead.all()
    total, logs = m.loss(x, y)
    assert logs["losses/auxk"] > 0 and logs["sparsity/dead_fraction"] == dead.float().mean()
    total.backward()
    g = m.clt.W_enc.grad.abs().sum(-1)  # [L, F]
    assert (g[dead] > 0).any()  # dead features get gradient (only through AuxK under TopK)


def test_jumprelu_loss_terms_and_threshold_gradient():
    m = module("jumprelu", F=16, sparsity_coeff=1.0, sparsity_warmup_frac=0.0)
    x, y = data()
    m.initialize_from_data(x, y)
    total, logs = m.loss(x, y)
    assert logs["losses/sparsity"] > 0 and logs["losses/preact"] >= 0
    torch.testing.assert_close(
        total, logs["losses/mse"] + logs["losses/sparsity"] + 3e-6 * logs["losses/preact"]
    )
    total.backward()
    assert m.clt.threshold_param.grad is not None and m.clt.threshold_param.grad.abs().sum() > 0
    assert m.clt.threshold_param.dtype == torch.float32


def test_sparse_decode_gives_the_dense_gradients_of_every_parameter():
    """Sparse decode reads only the rows on the gradient support; every parameter's gradient
    (JumpReLU θ included: it needs ∂L/∂a at inactive features in the band) equals the dense one."""
    for activation in ("topk", "batchtopk", "jumprelu", "relu"):
        grads = {}
        for decode in ("dense", "sparse"):
            m = module(activation, F=32, k=3, sparsity_coeff=0.1, sparsity_warmup_frac=0.0)
            m.clt.decode_path = decode
            m.clt.arch.bandwidth = 2.0  # a wide band: many inactive features inside it
            x, y = data()
            m.initialize_from_data(x, y)
            total, _ = m.loss(x, y)
            total.backward()
            grads[decode] = {k: p.grad.clone() for k, p in m.clt.named_parameters()}
        for k in grads["dense"]:
            torch.testing.assert_close(
                grads["sparse"][k], grads["dense"][k], rtol=1e-5, atol=1e-6, msg=f"{activation}: {k}"
            )


def test_the_pure_loss_equals_its_formula_without_lightning():
    """clt.loss.clt_loss on a bare CLT (no module, no trainer) against the formula written out."""
    from clt.loss import clt_loss
    from clt.model import CrossLayerTranscoder

    cfg = TrainConfig()
    c = cfg.clt
    c.activation, c.d_sae = "jumprelu", 16
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(CLTArchitecture(n_layers=3, d_model=8, d_sae=16, activation="jumprelu"), 0.05)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.5)
    x, y = data()
    dead = torch.zeros(3, 16, dtype=torch.bool)
    t = clt_loss(clt, x, y, c, 0.3, dead)
    h = torch.einsum("nld,lfd->nlf", x * clt.input_scale[:, None], clt.W_enc) + clt.b_enc
    a = h * (h > clt.threshold)
    y_hat = clt.b_dec.expand(len(x), 3, 8).clone()
    for s in range(3):
        for j, tgt in enumerate(range(s, 3)):
            y_hat[:, tgt] += a[:, s] @ clt.W_dec[s][:, j]
    y_n = y * clt.output_scale[:, None]
    sse = (y_hat - y_n).pow(2).sum(-1).mean(0)
    sst = (y_n - y_n.mean(0)).pow(2).sum(-1).mean(0)
    norms = torch.stack([clt.W_dec[s].pow(2).sum((1, 2)).sqrt() for s in range(3)])  # [L, F], all targets
    sparsity = torch.tanh(c.sparsity_c * a * norms).sum((1, 2)).mean()
    preact = ((clt.threshold - h).relu() * norms).sum((1, 2)).mean()
    want = sse.sum() / sst.sum() + 0.3 * sparsity + c.preact_coeff * preact
    torch.testing.assert_close(t.total, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.a.dense(), a)  # (JumpReLU trains from its entries)
    assert t.auxk is None and t.sparsity is not None


def test_topk_entries_equal_the_dense_activations():
    """TopK's entries (what training decodes): the dense a they stand for, its L0 and its fired
    features, including entries whose value is 0 (a negative k-th largest h)."""
    from clt.metrics import fired, l0_per_layer
    from clt.sparsity import TopKActivations, topk

    torch.manual_seed(3)
    h = torch.randn(50, 3, 12) - 1.0  # many rows with negative values among the top k
    e = TopKActivations.of(h, 4)
    a = topk(h, 4)
    assert (e.vals == 0).any()
    torch.testing.assert_close(e.dense(), a)
    torch.testing.assert_close(l0_per_layer(e), l0_per_layer(a))
    assert torch.equal(fired(e), (a != 0).any(0))


@pytest.mark.parametrize("decode", ["sparse", "dense", "triton"])
def test_topk_training_loss_from_entries_equals_its_formula(decode, monkeypatch):
    """The TopK loss as training computes it (the entries straight to the decode, no dense a), with
    AuxK on: the loss and every parameter gradient against the formula written out with the dense
    a and the double loop. On CPU `triton` runs under the interpreter (fp32, small shapes)."""
    from clt.loss import clt_loss
    from clt.sparsity import TopKActivations

    if decode == "triton":
        from clt import kernels

        if not kernels.triton_available():
            pytest.skip("triton is not installed")
    m = module("topk", F=16, k=3)
    clt, c = m.clt, m.cfg.clt
    clt.decode_path = decode
    x, y = data(24)
    m.initialize_from_data(x, y)
    dead = torch.zeros(3, 16, dtype=torch.bool)
    dead[:, ::3] = True
    t = clt_loss(clt, x, y, c, 0.0, dead)
    assert isinstance(t.a, TopKActivations)
    t.total.backward()
    got = {k: p.grad.clone() for k, p in clt.named_parameters()}
    clt.zero_grad()

    h = torch.einsum("nld,lfd->nlf", x * clt.input_scale[:, None], clt.W_enc) + clt.b_enc
    vals, idx = h.topk(3, dim=-1)
    a = torch.zeros_like(h).scatter(-1, idx, vals.relu())

    def decode_loop(acts):
        out = torch.zeros(len(x), 3, 8)
        for s in range(3):
            for j, tgt in enumerate(range(s, 3)):
                out[:, tgt] = out[:, tgt] + acts[:, s] @ clt.W_dec[s][:, j]
        return out

    y_hat = decode_loop(a) + clt.b_dec
    y_n = y * clt.output_scale[:, None]
    sst = (y_n - y_n.mean(0)).pow(2).sum(-1).mean(0)
    mse = (y_hat - y_n).pow(2).sum(-1).mean(0).sum() / sst.sum()
    masked = h.masked_fill(~dead, torch.finfo(h.dtype).min)
    av, ai = masked.topk(min(c.auxk_k, 6), dim=-1)
    e_hat = decode_loop(torch.zeros_like(h).scatter(-1, ai, av.relu()))
    aux = (e_hat - (y_n - y_hat).detach()).pow(2).sum(-1).mean(0).sum() / sst.sum()
    want = mse + c.auxk_coeff * aux
    want.backward()
    torch.testing.assert_close(t.total, want, rtol=1e-5, atol=1e-6)
    for k, p in clt.named_parameters():
        torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
def test_bf16_autocast_keeps_fp32_weights_and_gradients(activation):
    """trainer.precision=bf16-mixed is torch.autocast(bf16) around the loss: the GEMMs take bf16
    inputs, the weights, JumpReLU's θ and every gradient stay fp32, and the loss and gradients
    agree with the fp32 step to bf16's precision (the decode sums in fp32, so only the encoder's
    GEMM rounds)."""
    out = {}
    for precision in ("fp32", "bf16"):
        m = module(activation, F=32, k=3, sparsity_coeff=0.1, sparsity_warmup_frac=0.0)
        x, y = data()
        m.initialize_from_data(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            total, _ = m.loss(x, y)
        total.backward()
        assert total.dtype == torch.float32
        out[precision] = (total.detach(), {k: p.grad for k, p in m.clt.named_parameters()})
        assert all(p.dtype == torch.float32 for p in m.clt.parameters())
        assert all(g.dtype == torch.float32 for g in out[precision][1].values())
    assert out["bf16"][0] != out["fp32"][0]  # autocast rounded something
    torch.testing.assert_close(out["bf16"][0], out["fp32"][0], rtol=2e-2, atol=0)
    for k, g in out["fp32"][1].items():
        cos = torch.nn.functional.cosine_similarity(out["bf16"][1][k].flatten(), g.flatten(), dim=0)
        assert cos > 0.97, (k, float(cos))


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_300_training_steps_match_the_dense_reference(activation, monkeypatch):
    """300 optimizer steps of the training loss through the paths training takes on CPU (TopK's
    entries, the C decode kernel, the sparse encoder weight gradient) and through the dense fp32
    reference (dense decode; monkeypatched: no kernel, dense encoder GEMM): the loss curves agree
    step by step and the final weights are close."""

    def train(reference_path: bool):
        with monkeypatch.context() as mp:
            if reference_path:
                mp.setattr(cpu, "usable", lambda *tensors: False)
            m = module(activation, F=64, k=4, sparsity_coeff=0.05, sparsity_warmup_frac=0.0)
            m.clt.decode_path = "dense" if reference_path else "sparse"
            torch.manual_seed(5)
            x = torch.randn(128, 3, 8) * 3
            y = torch.einsum("nld,lde->nle", x, torch.randn(3, 8, 8)) + 0.1 * torch.randn(128, 3, 8)
            m.initialize_from_data(x, y)
            opt = torch.optim.Adam(m.clt.parameters(), lr=3e-3)
            curve = []
            for step in range(300):
                i = (step * 32) % 128
                total, _ = m.loss(x[i : i + 32], y[i : i + 32])
                opt.zero_grad()
                total.backward()
                opt.step()
                curve.append(float(total))
        return torch.tensor(curve), {k: p.detach().clone() for k, p in m.clt.named_parameters()}

    assert cpu.library() is not None
    fast, fast_w = train(False)
    ref, ref_w = train(True)
    assert ref[-20:].mean() < 0.7 * ref[:20].mean()  # it trained
    torch.testing.assert_close(fast, ref, rtol=1e-3, atol=1e-4)
    for k in ref_w:
        torch.testing.assert_close(fast_w[k], ref_w[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("max_norm", [0.05, 1e3], ids=["clipping", "not-clipping"])
def test_clipping_folded_into_fused_adam_equals_clip_then_step(max_norm):
    """The gradient clip as training runs it with fused Adam (the norm, then Adam dividing each
    gradient by grad_scale in its own pass) against torch's clip_grad_norm_ then the step (a large
    eps, so that the update depends on the gradients' scale)."""
    weights = {}
    for how in ("folded", "torch", "none"):
        m = module("topk", F=32, k=3)
        x, y = data()
        m.initialize_from_data(x, y)
        opt = torch.optim.Adam(m.clt.parameters(), lr=1e-2, eps=0.1, fused=True)
        for _ in range(3):
            opt.zero_grad()
            m.loss(x, y)[0].backward()
            if how == "folded":
                assert m.folds_clipping(opt, "norm")
                m.configure_gradient_clipping(opt, max_norm, "norm")
            elif how == "torch":
                norm = torch.nn.utils.clip_grad_norm_(m.clt.parameters(), max_norm)
            opt.step()
        weights[how] = {k: p.detach().clone() for k, p in m.clt.named_parameters()}
    assert (norm > max_norm) == (max_norm < 1)
    for k, w in weights["torch"].items():
        torch.testing.assert_close(weights["folded"][k], w, rtol=1e-5, atol=1e-7, msg=k)
    moved = not torch.allclose(weights["none"]["W_enc"], weights["torch"]["W_enc"], rtol=1e-4, atol=1e-6)
    assert moved == (max_norm < 1)  # the clip changed the step where it clipped
