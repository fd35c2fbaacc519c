"""QK attribution and head loadings (clt.attribution.qk) on tiny random models of every family and a
briefly trained CLT: the residual parts sum to resid_pre, the pair contributions to the head's score,
and per-head loadings plus a bypass computed independently (the source's path through one layer's
attention cut) to the graph's edge; attribute(..., attention=True) stores them and the viewer
serves them."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from test_attribution import train_briefly
from test_circuits import FAMILIES, T, replacement

from clt.attribution import Graph, ReplacementModel, attribute
from clt.attribution.qk import (
    _positions,
    _side,
    _target_objective,
    _z_hooks,
    attention_run,
    cross_position_edges,
    head_loadings,
    qk_attribution,
    residual_parts,
    source_perturbations,
)
from clt.circuits.heads import Heads
from clt.errors import CircuitError


@functools.cache
def trained(family: str):
    """The same tiny model with a CLT trained for a few steps (real sparsity, real errors)."""
    rm, ctx = replacement(family)
    clt = train_briefly(copy.deepcopy(rm.clt), rm.subject)
    rm2 = ReplacementModel(rm.subject, clt)
    return rm2, rm2.prepare(ctx.ids)


def cases():
    return [*[(f, False) for f in FAMILIES], ("llama", True), ("gemma2", True), ("gpt2", True)]


@pytest.mark.parametrize("family,is_trained", cases())
def test_residual_parts_sum_to_resid_pre_and_pairs_to_the_score(family, is_trained):
    rm, ctx = trained(family) if is_trained else replacement(family)
    run = attention_run(rm, ctx)
    heads = run.heads
    R = heads.rotations(T)
    for m in range(len(heads)):
        for p in range(T):
            parts = residual_parts(rm, ctx, run, m, p)
            scale = parts.vectors.abs().sum(0).max()
            assert (parts.vectors.sum(0) - run.resid_pre[m][p]).abs().max() <= 1e-5 * scale
        S = heads[m].scores(run.resid_pre[m], R)  # the head's own scores (checked against the model)
        for h in range(heads.n_heads):
            for q, k in [(T - 1, 0), (T - 1, T - 1), (6, 3), (4, 1)]:
                a = qk_attribution(rm, ctx, m, h, q, k, run)
                assert abs(float(a.pairs.sum()) - float(S[h, q, k])) <= 1e-5 * a.magnitude
                assert abs(float(a.query_marginal.sum()) - a.score) <= 1e-5 * a.magnitude
                assert abs(float(a.key_marginal.sum()) - a.score) <= 1e-5 * a.magnitude
                assert a.pairs.shape == (len(a.query_sources), len(a.key_sources))
    # the decomposition has feature and head sources, not only tokens and constants
    p = int((ctx.a[:, :2] != 0).sum((1, 2)).argmax())
    kinds = {u[0] for u in qk_attribution(rm, ctx, 2, 0, p, 1, run).query_sources}
    assert {"feature", "error", "token", "head", "constant", "bias"} <= kinds


def test_qk_query_side_is_the_models_query():
    """Σ_u Q_u(p) = the query the model computes at p (rotated, q-norm'd), for Qwen 3."""
    rm, ctx = replacement("qwen3")
    run = attention_run(rm, ctx)
    lh = run.heads[2]
    R = run.heads.rotations(T)
    Q = _side(lh, run, ctx, residual_parts(rm, ctx, run, 2, 7), 7, 1, "q", R).sum(0)
    torch.testing.assert_close(Q, lh.queries(run.resid_pre[2], R)[1, 7], atol=1e-5, rtol=1e-5)


def blocked_edge(rm, ctx, graph, t: int, s: int, heads: Heads, block: set[int]) -> float:
    """The edge s → t recomputed in the frozen model by forward-mode AD, with the source's
    perturbation cut at the attention of the layers in `block`."""
    dE, dM = source_perturbations(rm, ctx, graph, [s])
    handles = _z_hooks(heads, {}, grads=False, block=block)
    try:
        with fwAD.dual_level():
            E = fwAD.make_dual(ctx.E[None].clone(), dE)
            M = fwAD.make_dual(rm.mlp_outputs(ctx)[None].clone(), dM)
            xs, hidden = rm.frozen_run(ctx, E, M)
            xs = [fwAD.unpack_dual(x).tangent for x in xs]
            hidden = fwAD.unpack_dual(hidden).tangent
    finally:
        for hd in handles:
            hd.remove()
    xs = [torch.zeros_like(ctx.E[None]) if x is None else x for x in xs]
    return float(_target_objective(rm, ctx, graph, [t], xs, hidden))


@pytest.mark.parametrize("family,is_trained", cases())
def test_head_loadings_plus_bypass_equal_the_edge(family, is_trained):
    rm, ctx = trained(family) if is_trained else replacement(family)
    g = attribute(ctx.ids, rm.clt, rm, verbose=False, batch_size=16)
    cross = cross_position_edges(g)
    pos = _positions(g)
    assert cross and all(pos[t] != pos[s] for t, s in cross)
    cross = cross[:: max(1, len(cross) // 10)][:10]
    heads = Heads(rm.model)
    hl = head_loadings(rm, ctx, g, torch.tensor(cross), heads)
    assert hl.loadings.abs().sum() > 0
    for e, (t, s) in enumerate(cross):
        assert blocked_edge(rm, ctx, g, t, s, heads, set()) == pytest.approx(
            float(hl.edge[e]), rel=1e-4, abs=1e-9
        )
        for m in range(len(heads)):
            bypass = blocked_edge(rm, ctx, g, t, s, heads, {m})
            scale = abs(bypass) + float(hl.loadings[e, m].abs().sum()) + 1e-12
            assert abs(bypass + float(hl.loadings[e, m].sum()) - float(hl.edge[e])) <= 1e-4 * scale
            assert float(hl.bypass[e, m]) == pytest.approx(bypass, abs=1e-4 * scale)
    # outside (source layer, target layer] nothing passes through attention
    for e, (_, s) in enumerate(cross):
        if s < g.n_features:
            assert (hl.loadings[e, : g.feature_of(s)[0] + 1] == 0).all()


def test_attribute_with_attention_stores_it_and_the_viewer_serves_it(tmp_path):
    from clt.viewer.graphs import LoadedGraph

    rm, ctx = trained("llama")
    g = attribute(ctx.ids, rm.clt, rm, verbose=False, batch_size=16, attention=True)
    att = g.attention
    assert att is not None and len(att["edges"]) > 0 and att["qk"]
    edge = g.adjacency_matrix[att["edges"][:, 0], att["edges"][:, 1]]
    torch.testing.assert_close(
        att["loadings"].sum(-1) + att["bypass"], edge[:, None].expand_as(att["bypass"])
    )
    g.to_pt(tmp_path / "g.pt")
    lg = LoadedGraph("g", Graph.from_pt(tmp_path / "g.pt"), 0)
    target = int(att["edges"][0, 0])
    served = lg.neighbours(lg.nodes[target]["id"])["attention"]
    assert served["inputs"] and all("heads" in x for x in served["inputs"])
    rec = att["qk"][0]
    q_node = next(i for i in range(g.n_nodes) if lg.nodes[i]["pos"] == rec["query"] and lg.attention(i)["qk"])
    shown = lg.attention(q_node)["qk"][0]
    assert shown["pairs"] and isinstance(shown["pairs"][0][0], str)
    assert Graph.from_pt(tmp_path / "g.pt").attention is not None
    assert attribute(ctx.ids, rm.clt, rm, verbose=False).attention is None


def test_bad_positions_and_heads_are_clear_errors():
    rm, ctx = replacement("llama")
    with pytest.raises(CircuitError, match="need 0 ≤ key ≤ query"):
        qk_attribution(rm, ctx, 1, 0, 3, 5)
    with pytest.raises(CircuitError, match="head 9 of layer 1"):
        qk_attribution(rm, ctx, 1, 9, 3, 1)
