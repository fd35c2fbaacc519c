"""Attention circuits (clt.circuits): per-head extraction against each family's own attention,
rotations, composition scores against closed forms and the dense definition, eigen-positivity,
pattern scores on synthetic patterns, virtual weights against the frozen replacement model, the
`clt heads` command and bad input."""

from __future__ import annotations

import functools
import math
import sys

import pytest
import torch
from conftest import tiny_model

from clt.attribution import ReplacementModel
from clt.circuits import weights as W
from clt.circuits.heads import Heads, LayerHeads, record
from clt.circuits.patterns import head_scores, pattern_scores, repeated_tokens, uniform_baseline
from clt.circuits.virtual import head_virtual_weights, virtual_weights
from clt.errors import CircuitError
from clt.model import CLTArchitecture, CrossLayerTranscoder
from clt.subject import Subject

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox"]
T = 12  # longer than the sliding windows (4) of mistral and gemma2


@functools.cache
def model_of(family: str):
    kw: dict = {"bos_token_id": 1}
    if family == "gemma2":  # soft cap on the scores, and a window shorter than the prompt
        kw |= {"attn_logit_softcapping": 2.0, "sliding_window": 4}
    if family == "gpt_neox":
        kw |= {"rotary_pct": 0.25}
    model = tiny_model(family, **kw).float()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-trivial norm gains and biases, so that folding them is exercised
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or "bias" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
            if family == "gemma2" and ("q_proj" in name or "k_proj" in name):
                p.mul_(20.0)  # scores large enough for the soft cap to bend them
    return model


def prompt(seed: int = 2) -> torch.Tensor:
    ids = torch.randint(2, 1000, (1, T), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = 1
    return ids


# ---------------------------------------------------------------------------------------------
# Per-head extraction and rotations


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_reproduce_the_models_attention(family):
    model = model_of(family)
    heads = Heads(model)
    rec = record(model, prompt())
    R = heads.rotations(T)
    for m, lh in enumerate(heads.heads):
        A = lh.pattern(rec.resid_pre[m][0], R)
        torch.testing.assert_close(A, rec.patterns[m][0], atol=1e-5, rtol=0)
    if family == "gemma2":  # the soft cap bends the scores, and a sliding layer masks some keys
        S = heads[0].scores(rec.resid_pre[0][0], R)
        assert S.abs().max() > 2.0
        assert any(lh.sliding_window == 4 for lh in heads.heads)
        assert (rec.patterns[0][0][:, T - 1, : T - 4] == 0).all()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt_neox"])
def test_rotations_are_orthogonal_relative_and_the_models_own(family):
    model = model_of(family)
    heads = Heads(model)
    R = heads.rotations(20)
    D = heads.head_dim
    eye = torch.eye(D)
    torch.testing.assert_close(R[0], eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(R @ R.transpose(1, 2), eye.expand(20, D, D), atol=1e-6, rtol=0)
    for p, j, c in [(5, 2, 3), (9, 0, 7), (4, 4, 11)]:
        torch.testing.assert_close(R[p + c].T @ R[j + c], R[p].T @ R[j], atol=1e-6, rtol=0)
    # against the module's own rotary code on random vectors
    base = getattr(model, model.base_model_prefix)
    cos, sin = base.rotary_emb(torch.zeros(1, 20, D), torch.arange(20)[None])
    apply = sys.modules[type(heads.attn_modules[0]).__module__].apply_rotary_pos_emb
    q = torch.randn(1, 3, 20, D)
    ref, _ = apply(q, q, cos, sin)
    torch.testing.assert_close(torch.einsum("tij,btj->bti", R, q[0])[None], ref, atol=1e-6, rtol=0)
    if family == "gpt_neox":  # partial rotary: the last 3/4 of the head dims are not rotated
        rot = D // 4
        torch.testing.assert_close(R[:, rot:, rot:], eye[rot:, rot:].expand(20, -1, -1), atol=0, rtol=0)
        assert (R[:, :rot, rot:] == 0).all() and (R[7, :rot, :rot] - eye[:rot, :rot]).abs().max() > 0.1


def test_gpt2_has_no_rotations():
    assert Heads(model_of("gpt2")).rotations(5) is None


# ---------------------------------------------------------------------------------------------
# Composition, baseline, eigen-positivity


def e(i: int, d: int = 8) -> torch.Tensor:
    return torch.eye(d)[i]


def hand_heads(d: int = 8) -> list[LayerHeads]:
    """Layer 0, head 0 writes e2, e3 from e0, e1 (W_OV = e2e0ᵀ + e3e1ᵀ). Layer 1: head A's keys read
    e2, e3 (W_QK = e4e2ᵀ + e5e3ᵀ), head B's queries read them (W_QK = e2e4ᵀ + e3e5ᵀ), head C's values
    read them (W_OV = e6e2ᵀ + e7e3ᵀ). Other heads are random."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g)

    def layer(m, q, k, v, o):
        z = torch.zeros(3, 2)
        return LayerHeads(
            m,
            torch.stack(q),
            z,
            torch.stack(k),
            z,
            torch.stack(v),
            z,
            torch.stack(o),
            torch.zeros(d),
            1.0,
            None,
            None,
            False,
            1e-6,
        )

    rows = lambda *i: torch.stack([e(j, d) for j in i])  # noqa: E731  [2, d]
    cols = lambda *i: torch.stack([e(j, d) for j in i], 1)  # noqa: E731  [d, 2]
    l0 = layer(
        0,
        [rnd(2, d), rnd(2, d), rnd(2, d)],
        [rnd(2, d), rnd(2, d), rnd(2, d)],
        [rows(0, 1), rnd(2, d), rnd(2, d)],
        [cols(2, 3), rnd(d, 2), rnd(d, 2)],
    )
    l1 = layer(
        1,
        [rows(4, 5), rows(2, 3), rnd(2, d)],
        [rows(2, 3), rows(4, 5), rnd(2, d)],
        [rnd(2, d), rnd(2, d), rows(2, 3)],
        [rnd(d, 2), rnd(d, 2), cols(6, 7)],
    )
    return [l0, l1]


def test_composition_on_hand_built_heads_equals_the_closed_forms():
    layers = hand_heads()
    c = W.composition_scores(layers, dtype=torch.float64)
    r = 1 / math.sqrt(2)
    assert c.K[0, 0, 1, 0] == pytest.approx(r, abs=1e-6) and c.Q[0, 0, 1, 0] == pytest.approx(0, abs=1e-6)
    assert c.Q[0, 0, 1, 1] == pytest.approx(r, abs=1e-6) and c.K[0, 0, 1, 1] == pytest.approx(0, abs=1e-6)
    assert c.V[0, 0, 1, 2] == pytest.approx(r, abs=1e-6)
    # the order is pinned: the reversed product W_OV^{h1} W_OV^{C} is zero
    assert W.composition_dense(layers[0].W_OV(0), layers[1].W_OV(2)) == pytest.approx(0, abs=1e-7)
    # nothing composes backwards or within a layer
    assert (c.K[1] == 0).all() and (c.Q[:, :, 0] == 0).all() and (c.V[1, :, 1] == 0).all()
    # invariant to scaling either head
    layers[0].W_O[0] *= 7.0
    layers[1].W_Q[0] *= 0.1
    c2 = W.composition_scores(layers, dtype=torch.float64)
    torch.testing.assert_close(c2.K, c.K, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2", "gpt_neox"])
def test_composition_equals_the_dense_definition(family):
    heads = Heads(model_of(family))
    c = W.composition_scores(heads, dtype=torch.float64)
    for a, ha, b, hb in [(0, 0, 1, 3), (0, 2, 2, 1), (1, 3, 2, 0)]:
        A, B = heads[a], heads[b]
        ov = A.W_OV(ha)
        assert float(c.K[a, ha, b, hb]) == pytest.approx(W.composition_dense(B.W_QK(hb), ov), rel=1e-5)
        assert float(c.Q[a, ha, b, hb]) == pytest.approx(W.composition_dense(B.W_QK(hb).T, ov), rel=1e-5)
        assert float(c.V[a, ha, b, hb]) == pytest.approx(W.composition_dense(B.W_OV(hb), ov), rel=1e-5)
    assert 0 <= float(c.K.min()) and float(c.K.max()) <= 1
    if family != "gpt2":  # a RoPE offset rotates the query weights: W_QK(Δ) = (R_Δ Wq)ᵀ Wk
        c3 = W.composition_scores(heads, offset=3, dtype=torch.float64)
        R = heads.rotations(4)[3].double()
        B, A = heads[2], heads[0]
        ref = W.composition_dense((R @ B.Wq(1).double()).T @ B.Wk(1).double(), A.W_OV(0).double())
        assert float(c3.K[0, 0, 2, 1]) == pytest.approx(ref, rel=1e-5)


def test_random_baseline_is_one_over_root_d():
    d = 576
    assert 0.9 / math.sqrt(d) <= W.random_baseline(d, 64, n=100) <= 1.1 / math.sqrt(d)


def test_eigen_positivity_of_identity_minus_identity_and_a_cycle():
    eye = torch.eye(3)
    cycle = eye[[1, 2, 0]]  # a 3-cycle: eigenvalues 1, ω, ω̄
    assert W.positivity(W.ov_eigenvalues(eye, eye, eye, eye)) == pytest.approx(1.0, abs=1e-6)
    assert W.positivity(W.ov_eigenvalues(eye, -eye, eye, eye)) == pytest.approx(-1.0, abs=1e-6)
    assert W.positivity(W.ov_eigenvalues(eye, cycle, eye, eye)) == pytest.approx(0.0, abs=1e-6)
    # the D×D cyclic product has the nonzero eigenvalues of the V×V circuit
    g = torch.Generator().manual_seed(1)
    Wv, Wo, WE, WU = (
        torch.randn(*s, generator=g, dtype=torch.float64) for s in [(3, 8), (8, 3), (20, 8), (20, 8)]
    )
    small = W.ov_eigenvalues(Wv, Wo, WE, WU)
    full = torch.linalg.eigvals(WU @ Wo @ Wv @ WE.T)
    big = full[full.abs().argsort(descending=True)[:3]]
    key = lambda z: sorted(z.tolist(), key=lambda c: (round(c.real, 6), round(c.imag, 6)))  # noqa: E731
    for x, y in zip(key(small), key(big)):
        assert abs(x - y) < 1e-6 * max(1.0, abs(y))
    assert float(small.real.sum()) == pytest.approx(float(torch.trace(WU @ Wo @ Wv @ WE.T)), rel=1e-9)


def test_token_circuits_equal_their_full_products():
    heads = Heads(model_of("gpt2"))
    WE, WU = W.embedding_matrix(heads, 1), W.unembedding_matrix(heads)
    src = torch.tensor([3, 17, 99])
    full_ov = WU @ heads[1].W_OV(2) @ WE.T  # [V, V], small vocabulary
    torch.testing.assert_close(W.ov_circuit(heads, 1, 2, src), full_ov[:, src].T, atol=1e-5, rtol=1e-5)
    qk = W.qk_circuit(heads, 1, 2, src, torch.tensor([5, 6]))
    torch.testing.assert_close(
        qk, heads[1].scaling * WE[src] @ heads[1].W_QK(2) @ WE[[5, 6]].T, atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Pattern scores


def test_pattern_scores_of_synthetic_patterns_are_exact():
    n = 50
    Tn = 2 * n + 1
    ind = torch.zeros(Tn, Tn)
    ind[:, 0] = 1
    for p in range(n + 1, 2 * n + 1):
        ind[p] = 0
        ind[p, p - n + 1] = 1
    s = pattern_scores(ind, n)
    assert float(s["induction"]) == 1.0
    assert float(s["previous"]) == pytest.approx(1 / (2 * n))  # only row 1, whose previous token is BOS
    uniform = torch.tril(torch.ones(Tn, Tn))
    uniform = uniform / uniform.sum(-1, keepdim=True)
    assert float(pattern_scores(uniform, n)["induction"]) == pytest.approx(uniform_baseline(n), rel=1e-6)
    assert uniform_baseline(50) == pytest.approx(0.0136, abs=5e-5)
    prev = torch.zeros(Tn, Tn)
    prev[0, 0] = 1
    prev[torch.arange(1, Tn), torch.arange(0, Tn - 1)] = 1
    assert float(pattern_scores(prev, n)["previous"]) == 1.0


def test_repeated_tokens_and_head_scores_on_a_tiny_model():
    ids = repeated_tokens(3, 10, 100, 200, bos=1, seed=0)
    assert ids.shape == (3, 21) and (ids[:, 1:11] == ids[:, 11:]).all() and (ids[:, 0] == 1).all()
    assert all(len(set(r[1:11].tolist())) == 10 for r in ids)
    model = model_of("llama")
    hs = head_scores(model, n=10, batch=2)
    A = torch.stack(record(model, repeated_tokens(2, 10, 100, 1000, 1, 0)).patterns, 1).mean(0)
    torch.testing.assert_close(hs.induction, A[:, :, torch.arange(11, 21), torch.arange(2, 12)].mean(-1))
    assert hs.induction.shape == (3, 4) and math.isfinite(hs.loss_first) and math.isfinite(hs.loss_second)


# ---------------------------------------------------------------------------------------------
# Virtual weights against the frozen replacement model


@functools.cache
def replacement(family: str):
    model = model_of(family)
    sub = Subject(model, None, "auto")
    torch.manual_seed(0)
    arch = CLTArchitecture(n_layers=sub.n_layers, d_model=sub.d_model, d_sae=16, activation="topk", k=3)
    clt = CrossLayerTranscoder(arch)
    clt.input_scale.uniform_(0.5, 2.0)
    clt.output_scale.uniform_(0.5, 2.0)
    rm = ReplacementModel(sub, clt)
    return rm, rm.prepare(prompt()[0])


def response(rm, ctx, s: int, i: int, k: int, eps: float = 1e3) -> torch.Tensor:
    """Δh/ε [T, L, F] of the frozen model when a_{s,i}[k] grows by ε. The model is affine, so
    this is exact; a large ε keeps the fp32 rounding of h small against the change."""
    a = ctx.a.clone()
    a[k, s, i] += eps
    return (rm.frozen_forward(ctx, a=a)[0] - rm.frozen_forward(ctx)[0]) / eps


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_virtual_weights_are_the_frozen_response_with_attention_zeroed(family, monkeypatch):
    from clt.attribution.replacement import RecordedAttention

    rm, ctx = replacement(family)

    def zero(rec, value):  # every frozen head's output zero: only the residual path remains
        B, _, _, D = value.shape
        return value.new_zeros(B, rec.shape[1], rec.shape[0], D)

    monkeypatch.setattr(RecordedAttention, "apply", zero)
    s, i, k = 0, 5, 4
    dh = response(rm, ctx, s, i, k)
    for t in range(rm.n_layers):
        V = virtual_weights(rm.clt, s, t, sources=[i])[0]
        scale = V.abs().max() + dh[k, t].abs().max() + 1e-12
        assert (dh[k, t] - V).abs().max() <= 1e-5 * scale
    others = torch.ones(T, dtype=torch.bool)
    others[k] = False
    assert dh[others].abs().max() <= 1e-6 * dh.abs().max()
    # the CLT's normalisation folded into its weights gives the same virtual weights
    torch.testing.assert_close(
        virtual_weights(rm.clt.folded(), 0, 2), virtual_weights(rm.clt, 0, 2), rtol=1e-5, atol=1e-6
    )
    assert (virtual_weights(rm.clt, 2, 1) == 0).all() and (virtual_weights(rm.clt, 1, 1) == 0).all()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox"])
def test_one_hop_virtual_weights_are_the_frozen_edge(family):
    """t = s + 1: the response at query q to a unit change of a_{s,i}[k] is δ_qk V plus, through
    each head of layer t, A[q, k] / (σ_t[k] σ_post[q]) times its weight-only virtual weight."""
    rm, ctx = replacement(family)
    heads = Heads(rm.model)
    s, t, i, k = 0, 1, 5, 3
    dh = response(rm, ctx, s, i, k)[:, t]  # [T, F]
    lh = heads[t]
    attn, norm = (
        heads.attn_modules[t],
        getattr(heads.layers[t], "input_layernorm", None) or heads.layers[t].ln_1,
    )
    A = ctx.freeze.pattern(attn)  # [H, T, T]
    s_pre = ctx.freeze.scales[id(norm)][0, :, 0]  # 1/σ per position
    post = getattr(heads.layers[t], "post_attention_layernorm", None) if family == "gemma2" else None
    s_post = ctx.freeze.scales[id(post)][0, :, 0] if post is not None else torch.ones(T)
    V = virtual_weights(rm.clt, s, t, sources=[i])[0]
    for q in range(T):
        ref = V * (q == k)
        if family != "gpt_neox":  # parallel residual: layer t's attention is not in resid_mid_t
            for h in range(lh.n_heads):
                Vh = head_virtual_weights(rm.clt, heads, s, t, t, h, sources=[i])[0]
                ref = ref + A[h, q, k] * s_pre[k] * s_post[q] * Vh
        scale = ref.abs().max() + dh[q].abs().max() + 1e-12
        assert (dh[q] - ref).abs().max() <= 1e-5 * scale, (q, (dh[q] - ref).abs().max(), scale)
    assert dh[k + 1 :].abs().max() > 0 or family == "gpt_neox"  # the hop moved later positions


# ---------------------------------------------------------------------------------------------
# The command and bad input


def test_clt_heads_command_writes_tables_and_pictures(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from clt.cli import main

    out = tmp_path / "heads"
    assert (
        main(["heads", str(tiny_model_dir), "--out", str(out), "--n", "20", "--batch", "2", "--top", "3"])
        == 0
    )
    text = capsys.readouterr().out
    assert "induction head" in text and "K-composition" in text
    for name in ("heads.md", "scores.safetensors", "patterns.png", "composition.png"):
        assert (out / name).stat().st_size > 0
    saved = load_file(str(out / "scores.safetensors"))
    from transformers import AutoModelForCausalLM

    heads = Heads(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    assert float(saved["K"][0, 1, 2, 3]) == pytest.approx(
        W.composition_dense(heads[2].W_QK(3), heads[0].W_OV(1)), rel=1e-4
    )
    assert saved["induction"].shape == (3, 4) and saved["V"].shape == (3, 4, 3, 4)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    from clt.cli import main

    heads = Heads(model_of("llama"))
    with pytest.raises(CircuitError, match="head 4 of layer 1"):
        heads.head(1, 4)
    with pytest.raises(CircuitError, match="layer 3"):
        heads[3]
    with pytest.raises(CircuitError, match="model family 't5'"):
        Heads(model_of("llama"), family="t5")
    with pytest.raises(CircuitError, match="bidirectional"):  # a family we know, not its heads yet
        Heads(model_of("llama"), family="bert")
    rm, _ = replacement("llama")
    with pytest.raises(CircuitError, match="not between"):
        head_virtual_weights(rm.clt, heads, 1, 2, 1, 0)
    assert main(["heads", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such directory" in err[0]
    assert main(["heads", "bundled:smollm2-135m-instruct", "--n", "0"]) == 2
    assert not list(tmp_path.glob("heads-*"))


@pytest.mark.slow
def test_smollm2_has_induction_heads_fed_by_previous_token_heads():
    from clt.circuits.report import analyse
    from clt.config import ModelConfig
    from clt.subject import load_subject

    rep = analyse(load_subject(ModelConfig(dtype="float32")).model, n=50, batch=4)
    p, c = rep.patterns, rep.composition
    m, h = divmod(int(p.induction.argmax()), p.induction.shape[1])
    assert float(p.induction[m, h]) > 0.5 and p.loss_second < 0.5 * p.loss_first
    sources = c.K[:m, :, m, h].flatten().argsort(descending=True)[:3]
    assert max(float(p.previous.flatten()[int(i)]) for i in sources) > 0.5
    med = float(c.K[c.K > 0].median())
    assert 0.5 * c.baseline < med < 2 * c.baseline


# ---------------------------------------------------------------------------------------------
# Attention-only toy models (toy.py)


def test_evaluation_ids_are_the_commonest_training_tokens_and_rows_draw_only_from_them():
    from clt.circuits.toy import common_tokens

    windows = iter([(torch.tensor([5, 5, 5, 7, 7, 1, 9]),), (torch.tensor([7, 5, 1, 1, 1, 3]),)])
    pool = common_tokens(windows, 2, 3, 12, special=[1])  # counts: 5→4, 7→3, 9→1, 3→1, 1 special
    assert pool[:2].tolist() == [5, 7] and pool.numel() == 3 and 1 not in pool.tolist()  # commonest first
    assert common_tokens(iter([(torch.tensor([4, 4, 2]),)]), 1, 10, 12, special=[]).tolist() == [4, 2]
    pool = torch.tensor([3, 11, 40, 41, 97, 120, 500])
    ids = repeated_tokens(6, 5, 0, 0, bos=1, seed=0, pool=pool)
    assert set(ids[:, 1:].flatten().tolist()) <= set(pool.tolist())
    assert all(len(set(r[1:6].tolist())) == 5 for r in ids) and (ids[:, 1:6] == ids[:, 6:]).all()
    with pytest.raises(CircuitError, match="cannot draw 8"):
        repeated_tokens(1, 8, 0, 0, bos=1, pool=pool)


def test_repeated_span_copies_one_span_of_the_window_over_a_later_stretch():
    from omegaconf import OmegaConf

    from clt.circuits.toy import SPAN_MIN, repeat_span
    from clt.config import ToyJobConfig, load_config
    from clt.errors import ConfigError

    window = torch.arange(1000, 1129)  # [T=129]: "BOS" 1000, then 128 distinct text tokens
    gen, gaps, lengths = torch.Generator().manual_seed(0), set(), set()
    for _ in range(200):
        out = repeat_span(window, gen)
        assert out[0] == window[0] and out.shape == window.shape
        changed = (out != window).nonzero().flatten()  # the copy's positions: one contiguous run
        j, length = int(changed[0]), changed.numel()
        assert (changed == torch.arange(j, j + length)).all() and SPAN_MIN <= length <= 64
        i = int(out[j]) - 1000  # where the copy came from: its source is untouched and earlier
        assert (out[j : j + length] == window[i : i + length]).all() and i + length <= j
        assert (out[i : i + length] == window[i : i + length]).all()
        gaps.add(j - i)
        lengths.add(length)
    assert len(gaps) > 50 and len(lengths) > 30  # neither the gap nor the length is fixed
    with pytest.raises(ConfigError, match="toy.repeat_spans"):
        load_config(OmegaConf.create({"toy": {"repeat_spans": 1.5}}), ToyJobConfig)
    with pytest.raises(ConfigError, match="data.context_size"):
        load_config(
            OmegaConf.create({"toy": {"repeat_spans": 0.5}, "data": {"context_size": 16}}), ToyJobConfig
        )


def test_toy_model_is_attention_only_and_trains(tmp_path):
    from omegaconf import OmegaConf

    from clt.circuits.toy import build, train_toy
    from clt.config import ConfigError, ToyJobConfig, load_config

    job = load_config(
        OmegaConf.create(
            {
                "data": {"context_size": 32, "batch_windows": 2, "eval_docs": 1},
                "toy": {
                    "layers": 2,
                    "d_model": 32,
                    "heads": 4,
                    "steps": 4,
                    "eval_every": 2,
                    "repeat_n": 10,
                    "out": str(tmp_path / "toy"),
                    "device": "cpu",
                },
            }
        ),
        ToyJobConfig,
    )
    model = build(job.toy, 1000, 32, 1, 2)
    outs = []
    hooks = [b.mlp.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.transformer.h]
    model(input_ids=torch.randint(0, 1000, (2, 16)))
    for h in hooks:
        h.remove()
    assert len(outs) == 2 and all((o == 0).all() for o in outs)  # each block adds only its attention
    out = train_toy(job, progress=False)
    lines = (out / "history.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "induction" in lines[0]
    for name in ("model/config.json", "history.png", "heads/heads.md", "heads/patterns.png"):
        assert (out / name).exists()
    import json

    ids = json.loads((out / "eval_ids.json").read_text())  # the evaluation's ids: common corpus tokens
    assert len(ids) == 2000 and len(set(ids)) == 2000
    from transformers import AutoModelForCausalLM

    # toy.vocab: its own ids (BOS/EOS, the commonest tokens, "other"), mapped in toy_vocab.json
    job.toy.vocab, job.toy.eval_vocab, job.toy.out = 300, 100, str(tmp_path / "small")
    small = train_toy(job, progress=False)
    kept = json.loads((small / "model" / "toy_vocab.json").read_text())
    assert len(kept) == 300 and kept[-1] == -1 and len(set(kept)) == 300
    m = AutoModelForCausalLM.from_pretrained(small / "model")
    assert m.config.vocab_size == 300 and not (small / "model" / "tokenizer.json").exists()
    from clt.circuits.report import main as heads_main  # `clt heads` reads it without a tokenizer

    assert heads_main([str(small / "model"), "--n", "10", "--batch", "1", "--out", str(tmp_path / "h")]) == 0
    assert (tmp_path / "h" / "heads.md").exists()
    tok_ids = json.loads((out / "eval_ids.json").read_text())[:100]  # the same commonest tokens
    assert [kept[i] for i in json.loads((small / "eval_ids.json").read_text())] == tok_ids
    with pytest.raises(ConfigError, match="toy.eval_vocab"):
        load_config(OmegaConf.create({"toy": {"vocab": 100, "eval_vocab": 2000}}), ToyJobConfig)

    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    assert all((p == 0).all() for b in trained.transformer.h for p in b.mlp.parameters())
    assert Heads(trained).n_heads == 4
    with pytest.raises(ConfigError, match="toy.heads"):
        load_config(OmegaConf.create({"toy": {"d_model": 30, "heads": 4}}), ToyJobConfig)
    with pytest.raises(ConfigError, match="toy.arch"):
        load_config(OmegaConf.create({"toy": {"arch": "mamba"}}), ToyJobConfig)


def test_rotary_toy_model_is_attention_only_and_its_heads_are_read():
    from types import SimpleNamespace

    from clt.circuits.toy import build

    cfg = SimpleNamespace(arch="llama", d_model=32, layers=2, heads=4)
    model = build(cfg, 300, 32, 1, 2).eval()
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    ids = torch.randint(3, 300, (2, 16))
    outs = []
    hooks = [b.mlp.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.model.layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    assert len(outs) == 2 and all((o == 0).all() for o in outs)  # each block adds only its attention
    assert not any(p.requires_grad for b in model.model.layers for p in b.mlp.parameters())
    rec = record(model, ids)  # the rotary heads, through the model's own rotary code
    heads = Heads(model)
    R = heads.rotations(16)
    for m, lh in enumerate(heads.heads):
        torch.testing.assert_close(lh.pattern(rec.resid_pre[m][0], R), rec.patterns[m][0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# clt.norms: one affine form of every norm, shared by attribution, feature cards and circuits


def test_norm_affine_finds_each_gain_form_and_refuses_other_norms():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from clt import norms
    from clt.errors import FeatureError

    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    ln, gem, lla = torch.nn.LayerNorm(16), Gemma2RMSNorm(16), LlamaRMSNorm(16)
    with torch.no_grad():
        for m in (ln, gem, lla):
            m.weight.uniform_(0.2, 1.5)
        ln.bias.normal_()
    for m in (ln, gem, lla):
        gain, bias, centred, eps = norms.norm_affine(m)
        z = x - x.mean(-1, keepdim=True) if centred else x
        mine = z * norms.inv_sigma(x, centred, eps) * gain + (0 if bias is None else bias)
        assert torch.allclose(mine, m(x), atol=1e-5), type(m).__name__
    assert torch.allclose(norms.norm_affine(gem)[0], 1 + gem.weight)  # Gemma: 1 + w, found by probing
    assert norms.norm_affine(ln.to(torch.bfloat16))[2]  # a bf16 norm is within its own rounding

    class ScaledRMSNorm(LlamaRMSNorm):  # not a plain norm: the probe sees it
        def forward(self, h):
            return 2 * super().forward(h) + 0.1

    with pytest.raises(FeatureError, match="not a plain RMSNorm/LayerNorm"):
        norms.norm_affine(ScaledRMSNorm(16), FeatureError)
    with pytest.raises(FeatureError, match="not a RMSNorm or LayerNorm"):
        norms.norm_affine(torch.nn.Linear(4, 4), FeatureError)
    for fam in ("gpt2", "llama", "gpt_neox", "gemma2"):
        model = model_of(fam)
        base = getattr(model, model.base_model_prefix)
        want = {"gpt2": "ln_f", "gpt_neox": "final_layer_norm"}.get(fam, "norm")
        assert norms.final_norm(model) is getattr(base, want)


@pytest.mark.slow
@pytest.mark.timeout(5400)  # (the suite's 900 s would stop it)
def test_the_documented_toy_command_forms_an_induction_head_keyed_by_a_previous_token_head(tmp_path):
    """docs/circuits.md's command (~30 min on 2 CPU cores) ends with an induction head in layer 1
    whose strongest K-composition source is layer 0's previous-token head, and in-context learning:
    the second copy of repeated random tokens is predicted far better than the first."""
    import json
    import re
    import subprocess

    from conftest import REPO
    from safetensors.torch import load_file

    text = (REPO / "docs" / "circuits.md").read_text()
    cmd = re.search(r"^python toy.py (toy.arch=llama .*toy.repeat_spans=1.0.*)$", text, re.M)
    assert cmd, "docs/circuits.md no longer shows the induction-head command"
    out = tmp_path / "toy"
    done = subprocess.run(
        [sys.executable, "toy.py", *cmd.group(1).split(), f"toy.out={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=5400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert last["induction"] > 0.3 and last["previous"] > 0.5, last  # uniform attention: 0.0136
    assert last["loss_second_copy"] < last["loss_first_copy"] - 3, last
    s = load_file(out / "heads" / "scores.safetensors")
    ind = divmod(int(s["induction"].argmax()), s["induction"].shape[1])
    prev = int(s["previous"][0].argmax())  # layer 0's previous-token head
    assert ind[0] == 1, ind
    k = s["K"][0, :, 1, ind[1]]  # K[l_src, h_src, l_dst, h_dst]: layer 0's heads into the induction head
    assert int(k.argmax()) == prev and k[prev] > 1.5 / math.sqrt(128), (k, prev)  # baseline ≈ 1/√d, d=128
