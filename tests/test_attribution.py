"""Attribution graphs: perturbation faithfulness of every edge, exact row sums, the replacement
model against the subject and the spliced model, the batched rows against a dense per-node
reference, pruning against a direct matrix-inverse computation, scores, the viewer JSON,
interventions and generation, and bad input."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import tiny_model

from clt.attribution import (
    AttributionError,
    Graph,
    Intervention,
    ReplacementModel,
    adjacency,
    attribute,
    dense_rows,
    feature_vectors,
    graph_scores,
    prune,
    scores,
    to_json,
)
from clt.attribution.graph import influence_by_inverse, normalize_matrix, pruned_adjacency, write_graph_files
from clt.metrics import spliced_logits
from clt.model import CLTArchitecture, CrossLayerTranscoder
from clt.subject import Subject

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox"]
ACTIVATIONS = ["topk", "batchtopk", "jumprelu"]
T = 9  # prompt length (BOS included)


def family_kwargs(family: str) -> dict:
    kw: dict = {"bos_token_id": 1}
    if family == "gemma2":  # softcapping on both attention and the final logits
        kw |= {"final_logit_softcapping": 4.0, "attn_logit_softcapping": 3.0}
    return kw


def make_clt(sub: Subject, activation: str, seed: int = 0) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    arch = CLTArchitecture(n_layers=sub.n_layers, d_model=sub.d_model, d_sae=48, activation=activation, k=3)
    clt = CrossLayerTranscoder(arch, threshold_init=0.02)
    # non-trivial normalisation and biases, so that folding and constants are exercised
    clt.input_scale.uniform_(0.5, 2.0)
    clt.output_scale.uniform_(0.5, 2.0)
    with torch.no_grad():
        clt.b_dec.normal_(0, 0.1)
        clt.b_enc.normal_(0, 0.02)
    return clt


def train_briefly(clt: CrossLayerTranscoder, sub: Subject, steps: int = 40) -> CrossLayerTranscoder:
    """A few Adam steps on the tiny model's activations (random token sequences)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 1000, (8, 24), generator=g)
    ids[:, 0] = 1
    x, y = sub.capture(ids)
    x, y = x[:, 1:].reshape(-1, *x.shape[2:]).float(), y[:, 1:].reshape(-1, *y.shape[2:]).float()
    opt = torch.optim.Adam(clt.parameters(), lr=3e-3)
    clt.train()
    for _ in range(steps):
        a, y_hat = clt(x)
        loss = (y_hat - y).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        clt.update_batchtopk_threshold(0.9)
    return clt.eval()


@functools.cache
def case(family: str, activation: str, trained: bool):
    model = tiny_model(family, **family_kwargs(family)).float()
    sub = Subject(model, None, "auto")
    clt = make_clt(sub, activation)
    if trained:
        train_briefly(clt, sub)
    rm = ReplacementModel(sub, clt)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(2, 1000, (T,), generator=g)
    ids[0] = 1
    return rm, ids


def targets(rm: ReplacementModel, graph: Graph, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The values of the graph's target rows (selected features, then logits) from a frozen run."""
    f = graph.active_features[graph.selected_features]
    last = logits[-1]
    return torch.cat([h[f[:, 1], f[:, 0], f[:, 2]], last[graph.logit_tokens] - last.mean()])


def perturbed(ctx, graph: Graph, kind: str, s, delta: float):
    """The sources with one scaled by 1 + δ: kind "feature" (s: its graph index), "error" (s:
    (layer, pos)) or "token" (s: pos). -> (E, a, err, the graph column of that source)."""
    T = len(ctx.ids)
    E, a, err = ctx.E.clone(), ctx.a.clone(), ctx.err.clone()
    if kind == "feature":
        layer, pos, feat = graph.feature_of(s)
        a[pos, layer, feat] *= 1 + delta
        return E, a, err, s
    if kind == "error":
        layer, pos = s
        err[pos, layer] *= 1 + delta
        return E, a, err, graph.error_slice.start + layer * T + pos
    E[s] *= 1 + delta
    return E, a, err, graph.token_slice.start + s


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_perturbation_faithfulness(family, activation, trained):
    """Adding δ·(source value) to any source changes every target by A[t, s]·δ, and every row plus
    its bias is the target's value. The frozen model is exactly linear in its sources, so any δ
    tests the same identity; δ = 4 keeps the smallest measured changes well above the fp32
    rounding of the targets they are differences of (at δ = 0.5 one source's change was 7 ulps of
    the targets' magnitude, and its relative error 1.1e-4 was rounding, not the graph)."""
    rm, ids = case(family, activation, trained)
    graph = attribute(ids, rm.clt, rm, batch_size=16, verbose=False)
    assert graph.n_features == graph.info["n_active_features"] > 0
    ctx = rm.prepare(ids)
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_slice.start, graph.n_nodes)])
    A = graph.adjacency_matrix[rows]
    base = targets(rm, graph, *rm.frozen_forward(ctx))

    # exact row sums: Σ_s A[t, s] + bias[t] = value[t]
    row_sum = A.sum(1) + graph.node_bias[rows]
    torch.testing.assert_close(
        row_sum, graph.node_values[rows], rtol=1e-4, atol=1e-4 * base.abs().max().item()
    )
    torch.testing.assert_close(base, graph.node_values[rows], rtol=1e-4, atol=1e-5)

    gen = torch.Generator().manual_seed(3)
    delta = 4.0
    sources = []
    for i in torch.randperm(graph.n_features, generator=gen)[:6].tolist():
        sources.append(("feature", i))
    L = rm.n_layers
    for i in torch.randperm(L * (T - 1), generator=gen)[:5].tolist():
        layer, pos = divmod(i, T - 1)
        sources.append(("error", (layer, pos + 1)))
    for pos in (0, T // 2, T - 1):
        sources.append(("token", pos))

    worst = 0.0
    for kind, s in sources:
        E, a, err, col = perturbed(ctx, graph, kind, s, delta)
        change = targets(rm, graph, *rm.frozen_forward(ctx, E, a, err)) - base
        expected = A[:, col] * delta
        scale = expected.abs().max().item()
        err_abs = (change - expected).abs().max().item()
        assert err_abs <= 1e-4 * scale + 1e-6, (kind, s, err_abs, scale)
        if scale > 1e-3:
            worst = max(worst, err_abs / scale)
    assert worst <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_replacement_model_reproduces_subject_and_spliced_model(family):
    rm, ids = case(family, "topk", True)
    model = rm.model
    clean = model(input_ids=ids[None]).logits[0]
    ctx = rm.prepare(ids)
    torch.testing.assert_close(ctx.logits, clean, rtol=1e-5, atol=1e-5)
    # the frozen model (errors included, every source clean)
    _, pre = rm.frozen_forward(ctx)
    torch.testing.assert_close(rm.softcapped(pre), clean, rtol=1e-5, atol=1e-5)
    # the live model with errors: exactly the subject
    torch.testing.assert_close(rm.forward(ids, errors=True), clean, rtol=1e-5, atol=1e-5)
    # without errors: the spliced model of the core issue's evaluation
    _, spliced, _ = spliced_logits(rm.subject, rm.clt, ids[None])
    ours = rm.forward(ids, errors=False)
    torch.testing.assert_close(ours, spliced[0].float(), rtol=1e-5, atol=1e-5)
    assert (ours - clean).abs().max() > 1e-3  # the CLT is not perfect: the check can fail


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "gpt_neox", "qwen3"])
def test_frozen_attention_by_blocks_of_queries_is_the_whole_pattern(family, monkeypatch):
    """The frozen attention recomputes pattern rows by blocks of queries (memory linear in the
    prompt): one query per block gives the model's eager patterns, its logits and the same graph."""
    from clt.attribution import replacement

    rm, ids = case(family, "topk", True)
    whole = attribute(ids, rm.clt, rm, verbose=False)
    monkeypatch.setattr(replacement, "ATTENTION_BLOCK", 1)  # one query row per block
    ctx = rm.prepare(ids)
    model = rm.model
    old = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        out = model(input_ids=ids[None], output_attentions=True)
    finally:
        model.config._attn_implementation = old
    torch.testing.assert_close(ctx.logits, out.logits[0], rtol=1e-5, atol=1e-5)
    attn = [m for m in model.modules() if id(m) in ctx.freeze.attn]
    assert len(attn) == rm.n_layers
    for m, ref in zip(attn, out.attentions):
        torch.testing.assert_close(ctx.freeze.pattern(m), ref[0], rtol=1e-5, atol=1e-6)
    blocks = attribute(ids, rm.clt, rm, verbose=False)
    torch.testing.assert_close(blocks.adjacency_matrix, whole.adjacency_matrix, rtol=1e-5, atol=1e-6)


def test_logit_rows_are_pre_softcap():
    rm, ids = case("gemma2", "topk", False)
    graph = attribute(ids, rm.clt, rm, verbose=False)
    ctx = rm.prepare(ids)
    pre = ctx.logits_pre[-1]
    k = graph.logit_slice
    torch.testing.assert_close(graph.node_values[k], pre[graph.logit_tokens] - pre.mean())
    post = ctx.logits[-1]
    assert not torch.allclose(graph.node_values[k], post[graph.logit_tokens] - post.mean(), atol=1e-3)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_batched_rows_equal_dense_per_node_reference(activation, monkeypatch):
    rm, ids = case("llama", activation, True)
    # nothing cached and decoder blocks of one position: the path long prompts take
    monkeypatch.setattr(adjacency, "DECODER_BLOCK", 1)
    graph = attribute(ids, rm.clt, rm, batch_size=5, decoder_cache_bytes=0, verbose=False)
    graph2 = attribute(ids, rm.clt, rm, batch_size=64, verbose=False)  # all decoders cached, one batch
    torch.testing.assert_close(graph.adjacency_matrix, graph2.adjacency_matrix, rtol=1e-5, atol=1e-6)
    ctx = rm.prepare(ids)
    feats, vals = graph.active_features, graph.activation_values
    pick = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))[:8]
    f = feats[pick]
    ref = dense_rows(rm, ctx, feats, vals, f[:, 0], f[:, 1], feature_vectors(rm, f))
    n_cols = graph.logit_slice.start
    torch.testing.assert_close(graph.adjacency_matrix[pick, :n_cols], ref, rtol=1e-4, atol=1e-6)
    lv = rm.logit_vectors(graph.logit_tokens)
    K = len(lv)
    ref_logits = dense_rows(rm, ctx, feats, vals, torch.full((K,), rm.n_layers), torch.full((K,), T - 1), lv)
    torch.testing.assert_close(
        graph.adjacency_matrix[graph.logit_slice, :n_cols], ref_logits, rtol=1e-4, atol=1e-6
    )


def test_max_feature_nodes_visits_the_most_influential_features():
    rm, ids = case("llama", "jumprelu", True)
    full = attribute(ids, rm.clt, rm, verbose=False)
    part = attribute(ids, rm.clt, rm, max_feature_nodes=20, batch_size=8, update_interval=1, verbose=False)
    assert part.n_features == 20
    # the kept rows are the full graph's rows restricted to the kept columns
    keep = torch.cat([part.selected_features, torch.arange(full.n_features, full.logit_slice.start)])
    full_rows = torch.cat([part.selected_features, torch.arange(full.logit_slice.start, full.n_nodes)])
    part_rows = torch.cat([torch.arange(20), torch.arange(part.logit_slice.start, part.n_nodes)])
    torch.testing.assert_close(
        part.adjacency_matrix[part_rows][:, : part.logit_slice.start],
        full.adjacency_matrix[full_rows][:, keep],
        rtol=1e-5,
        atol=1e-6,
    )
    # what the dropped columns carried is kept per row: rows still add up to the targets' values
    rows = torch.cat([torch.arange(20), torch.arange(part.logit_slice.start, part.n_nodes)])
    total = part.adjacency_matrix[rows].sum(1) + part.node_unvisited[rows] + part.node_bias[rows]
    torch.testing.assert_close(total, part.node_values[rows], rtol=1e-4, atol=1e-4)
    assert part.node_unvisited[rows].abs().max() > 1e-4
    assert torch.equal(full.node_unvisited, torch.zeros(full.n_nodes))
    # the first visited features are the top features by direct effect on the logits
    A_hat = normalize_matrix(full.adjacency_matrix)
    direct = (full.logit_weights() @ A_hat)[: full.n_features]
    top = set(direct.topk(8).indices.tolist())
    assert top <= set(part.selected_features.tolist())


# ---------------------------------------------------------------------------------------------
# Pruning and scores on hand-built graphs


def hand_graph(A: np.ndarray, n_features: int, n_layers: int, n_pos: int, probs: list[float]) -> Graph:
    n_logits = len(probs)
    assert A.shape[0] == n_features + n_layers * n_pos + n_pos + n_logits
    feats = torch.tensor([[i % n_layers, i % n_pos, i] for i in range(n_features)])
    return Graph(
        prompt="x",
        input_tokens=torch.arange(n_pos),
        token_strings=[f"t{i}" for i in range(n_pos)],
        active_features=feats,
        activation_values=torch.ones(n_features),
        selected_features=torch.arange(n_features),
        edge_rows=Graph.rows_of(torch.tensor(A, dtype=torch.float32), n_features, n_logits),
        logit_tokens=torch.arange(n_logits),
        logit_token_strings=[f"l{i}" for i in range(n_logits)],
        logit_probabilities=torch.tensor(probs),
        n_layers=n_layers,
        vocab_size=10,
    )


def random_dag(seed: int, n_features=6, n_layers=2, n_pos=2, n_logits=2):
    rng = np.random.default_rng(seed)
    n = n_features + n_layers * n_pos + n_pos + n_logits
    A = np.zeros((n, n))
    src_end = n - n_logits
    for t in range(n_features):  # features read from earlier features and all errors/tokens
        A[t, :t] = rng.normal(size=t) * (rng.random(t) < 0.7)
        A[t, n_features:src_end] = rng.normal(size=src_end - n_features) * (
            rng.random(src_end - n_features) < 0.5
        )
    for t in range(src_end, n):
        A[t, :src_end] = rng.normal(size=src_end) * (rng.random(src_end) < 0.8)
    return A, n_features, n_layers, n_pos, [0.7, 0.2][:n_logits]


def numpy_prune(A, n_features, n_pos, probs, node_t, edge_t):
    """Direct computation: influence by matrix inverse, thresholds by sorting."""
    n = len(A)
    w = np.zeros(n)
    w[n - len(probs) :] = probs

    def norm(M):
        M = np.abs(M)
        s = M.sum(1, keepdims=True)
        return np.where(s > 0, M / np.where(s > 0, s, 1), 0)

    def infl(M):
        return w @ (np.linalg.inv(np.eye(n) - M) - np.eye(n))

    def cut(scores, t):
        s = np.sort(scores.flatten())[::-1]
        c = np.cumsum(s) / s.sum()
        i = min(int(np.searchsorted(c, t)), int((s > 0).sum()) - 1)
        return s[i]

    node_infl = infl(norm(A))
    keep = node_infl >= cut(node_infl, node_t)
    keep[n - len(probs) - n_pos :] = True
    P = A.copy()
    P[~keep] = 0
    P[:, ~keep] = 0
    Ph = norm(P)
    edge_scores = Ph * (infl(Ph) + w)[:, None]
    edges = (edge_scores >= cut(edge_scores, edge_t)) & (P != 0)
    return keep, edges, node_infl


@pytest.mark.parametrize("seed", range(5))
def test_pruning_matches_direct_inverse_computation(seed):
    A, nf, nl, npos, probs = random_dag(seed)
    g = hand_graph(A, nf, nl, npos, probs)
    w = g.logit_weights()
    A_hat = normalize_matrix(g.adjacency_matrix)
    from clt.attribution import compute_influence

    torch.testing.assert_close(
        compute_influence(A_hat, w).double(), influence_by_inverse(A_hat, w), rtol=1e-5, atol=1e-7
    )
    keep, edges, _ = numpy_prune(A, nf, npos, probs, 0.8, 0.98)
    p = prune(g, 0.8, 0.98)  # on the stored rows: the same influence as the dense inverse
    torch.testing.assert_close(p.influence.double(), influence_by_inverse(A_hat, w), rtol=1e-5, atol=1e-7)
    # before dangling removal the node set is exactly the direct one; dangling removal only drops
    dropped = keep & ~p.node_mask.numpy()
    assert not (p.node_mask.numpy() & ~keep).any()
    for i in np.nonzero(dropped)[0]:  # each dropped node lost all its outgoing (or incoming) kept edges
        out_kept = p.edge_mask[:, i].any() or not (A[:, i] != 0).any()
        in_kept = i >= nf or p.edge_mask[i].any() or not (A[i] != 0).any()
        assert not (out_kept and in_kept)
    em = p.edge_mask.numpy()
    assert not (em & ~edges).any()


def test_thresholds_of_one_keep_everything():
    A, nf, nl, npos, probs = random_dag(0)
    g = hand_graph(A, nf, nl, npos, probs)
    p = prune(g, 1.0, 1.0)
    assert p.node_mask.all()
    assert torch.equal(p.edge_mask, g.adjacency_matrix != 0)


def test_scores_on_a_hand_graph():
    # nodes: f (feature), e (error, 1 layer × 1 position), t (token), L (logit): t→f←e, f→L
    A = np.zeros((4, 4))
    A[0, 2] = 1.0  # f ← t
    A[0, 1] = 1.0  # f ← e
    A[3, 0] = 1.0  # L ← f
    g = hand_graph(A, 1, 1, 1, [1.0])
    s = graph_scores(g)
    assert s["replacement_score"] == pytest.approx(0.5)
    assert s["completeness_score"] == pytest.approx(2.5 / 3)  # circuit-tracer's convention: 0.833
    A[0, 1] = 0.0  # no error: everything explained
    assert graph_scores(hand_graph(A, 1, 1, 1, [1.0])) == {
        "replacement_score": 1.0,
        "completeness_score": 1.0,
    }


def test_pruned_scores_count_pruned_features_as_error():
    A, nf, nl, npos, probs = random_dag(1)
    g = hand_graph(A, nf, nl, npos, probs)
    p = prune(g, 0.5, 0.9)
    s = scores(g, p)
    assert 0 <= s["pruned/replacement_score"] <= 1 and 0 <= s["pruned/completeness_score"] <= 1
    merged = pruned_adjacency(g, p)
    gone = (~p.node_mask[:nf]).nonzero().flatten().tolist()
    assert gone
    expected = g.adjacency_matrix.clone()
    for i in gone:  # a pruned feature's outgoing edges now leave its (layer, position) error node
        layer, pos, _ = g.feature_of(i)
        expected[:, nf + layer * npos + pos] += expected[:, i]
    for i in gone:
        expected[:, i] = 0
        expected[i] = 0
    expected = Graph.rows_of(expected, nf, len(probs))  # the rows the graph stores
    torch.testing.assert_close(merged, expected)
    assert s["pruned/replacement_score"] == pytest.approx(graph_scores(g, expected)["replacement_score"])
    same = scores(g, prune(g, 1.0, 1.0))
    assert same["pruned/replacement_score"] == pytest.approx(same["full/replacement_score"])


# ---------------------------------------------------------------------------------------------
# Outputs


def viewer_schema():
    """The circuit-tracer viewer's graph file model (frontend/graph_models.py), in pydantic."""
    from pydantic import BaseModel

    class Metadata(BaseModel):
        slug: str
        scan: str
        transcoder_list: list[str]
        prompt_tokens: list[str]
        prompt: str
        node_threshold: float | None = None
        schema_version: int | None = 1

    class QParams(BaseModel):
        pinnedIds: list[str]
        supernodes: list[list[str]]
        linkType: str
        clickedId: str
        sg_pos: str

    class Node(BaseModel):
        node_id: str
        feature: int
        layer: str
        ctx_idx: int
        feature_type: str
        token_prob: float = 0.0
        is_target_logit: bool = False
        run_idx: int = 0
        reverse_ctx_idx: int = 0
        jsNodeId: str
        clerp: str = ""
        influence: float | None = None
        activation: float | None = None

    class Link(BaseModel):
        source: str
        target: str
        weight: float

    class Model(BaseModel):
        metadata: Metadata
        qParams: QParams
        nodes: list[Node]
        links: list[Link]

    return Model


def test_graph_json_validates_against_the_viewer_schema(tmp_path):
    import json

    rm, ids = case("llama", "topk", True)
    graph = attribute(ids, rm.clt, rm, verbose=False)
    graph.scan = "tiny-clt"
    p = prune(graph)
    path = write_graph_files(graph, p, tmp_path, "tiny", 0.8)
    data = json.loads(path.read_text())
    model = viewer_schema().model_validate(data)
    ids_ = [n.node_id for n in model.nodes]
    assert len(ids_) == len(set(ids_)) and len({n.jsNodeId for n in model.nodes}) == len(ids_)
    for link in model.links:
        assert link.source in ids_ and link.target in ids_
    kinds = {n.feature_type for n in model.nodes}
    assert {"embedding", "logit"} <= kinds
    assert sum(n.feature_type == "embedding" for n in model.nodes) == T
    logits = [n for n in model.nodes if n.feature_type == "logit"]
    assert (
        len(logits) == graph.n_logits
        and logits[0].is_target_logit
        and logits[0].layer == str(rm.n_layers + 1)
    )
    for n in model.nodes:
        if n.feature_type == "mlp reconstruction error":
            layer, minus_one, pos = n.node_id.split("_")
            assert minus_one == "-1" and n.feature == -1 and n.layer == layer and int(pos) == n.ctx_idx
        if n.feature_type == "cross layer transcoder":
            layer, feat, pos = map(int, n.node_id.split("_"))
            assert n.feature == (layer + feat) * (layer + feat + 1) // 2 + feat
    # link weights are the signed adjacency entries
    assert len(model.links) == int(p.edge_mask.sum())
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["tiny"]
    write_graph_files(graph, p, tmp_path, "tiny", 0.8)  # upsert, not duplicate
    assert len(json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]) == 1
    assert to_json(graph, p, "tiny", 0.8)["metadata"]["prompt_tokens"] == graph.token_strings


def test_graph_save_load_round_trip(tmp_path):
    rm, ids = case("gpt2", "jumprelu", False)
    graph = attribute(ids, rm.clt, rm, verbose=False)
    graph.to_pt(tmp_path / "g.pt")
    back = Graph.from_pt(tmp_path / "g.pt")
    assert torch.equal(back.adjacency_matrix, graph.adjacency_matrix)
    assert back.token_strings == graph.token_strings and back.info == graph.info
    assert scores(back, prune(back)) == scores(graph, prune(graph))
    (tmp_path / "bad.pt").write_bytes(b"not a graph")
    with pytest.raises(AttributionError, match="cannot read graph"):
        Graph.from_pt(tmp_path / "bad.pt")


# ---------------------------------------------------------------------------------------------
# Interventions


def test_constrained_intervention_is_the_direct_effect():
    rm, ids = case("llama", "jumprelu", True)
    graph = attribute(ids, rm.clt, rm, verbose=False)
    ctx = rm.prepare(ids)
    i = int(graph.adjacency_matrix[graph.logit_slice.start, : graph.n_features].abs().argmax())
    layer, pos, feat = graph.feature_of(i)
    a = float(ctx.a[pos, layer, feat])
    logits = rm.intervene(ids, [Intervention(layer, pos, feat, 3 * a)], mode="constrained", ctx=ctx)
    change = logits[-1] - ctx.logits[-1]
    demeaned = change[graph.logit_tokens] - change.mean()
    expected = graph.adjacency_matrix[graph.logit_slice, i] * 2  # the value went from a to 3a
    torch.testing.assert_close(demeaned, expected, rtol=1e-4, atol=1e-5)
    # scaling by 3 is the same intervention
    same = rm.intervene(ids, [Intervention(layer, pos, feat, 3.0, "scale")], mode="constrained", ctx=ctx)
    torch.testing.assert_close(same, logits)


def manual_free_intervention(rm: ReplacementModel, ids, layer, pos, feat, delta):
    """The subject model with delta · (the feature's decoder rows) added to the MLP outputs it writes."""
    clt = rm.clt

    def write(lay, y):
        if lay < layer:
            return None
        out = y.clone()
        out[0, pos] += delta * clt.W_dec[layer][feat, lay - layer] / clt.output_scale[lay]
        return out

    with torch.no_grad(), rm.subject.hooks({rm.subject.output_hook: write}):
        return rm.model(input_ids=ids[None]).logits[0]


def test_free_intervention_propagates_through_the_model():
    rm, ids = case("qwen2", "topk", True)
    ctx = rm.prepare(ids)
    torch.testing.assert_close(rm.intervene(ids, [], mode="free"), ctx.logits, rtol=1e-5, atol=1e-5)
    layer, pos = 0, 3
    feat = int(ctx.a[pos, layer].argmax())
    a = float(ctx.a[pos, layer, feat])
    free = rm.intervene(ids, [Intervention(layer, pos, feat, 0.0)], mode="free")  # ablate
    torch.testing.assert_close(
        free, manual_free_intervention(rm, ids, layer, pos, feat, -a), rtol=1e-4, atol=1e-5
    )
    assert torch.allclose(free[:pos], ctx.logits[:pos], atol=1e-5)  # causal
    constrained = rm.intervene(ids, [Intervention(layer, pos, feat, 0.0)], mode="constrained", ctx=ctx)
    assert not torch.allclose(free[-1], constrained[-1], atol=1e-4)  # indirect effects differ


def test_generation_holds_the_intervention():
    rm, ids = case("llama", "topk", True)
    ctx = rm.prepare(ids)
    feat = int(ctx.a[2, 1].argmax())
    iv = [Intervention(1, slice(2, None), feat, 5.0)]
    _, out_ids, step_logits = rm.generate(ids, iv, max_new_tokens=4)
    assert len(out_ids) == T + 4
    # the cached generation equals the full-sequence forward with the same open-ended intervention
    full = rm.forward(out_ids[:-1], iv)
    torch.testing.assert_close(step_logits, full[T - 1 :], rtol=1e-4, atol=1e-4)
    plain = rm.forward(out_ids[:-1])
    assert not torch.allclose(plain[T - 1 :], full[T - 1 :], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_is_a_clear_error():
    rm, ids = case("llama", "topk", False)
    with pytest.raises(AttributionError, match="context"):
        attribute(torch.randint(2, 1000, (600,)), rm.clt, rm, verbose=False)
    with pytest.raises(AttributionError, match="empty"):
        attribute("", rm.clt, rm, verbose=False)
    with pytest.raises(AttributionError, match="empty"):
        attribute(torch.tensor([1]), rm.clt, rm, verbose=False)
    other = CrossLayerTranscoder(CLTArchitecture(n_layers=3, d_model=64, d_sae=16, subject_model="gpt2-xl"))
    with pytest.raises(AttributionError, match="wrong checkpoint"):
        attribute(ids, other, rm.subject, verbose=False)
    graph = attribute(ids, rm.clt, rm, verbose=False)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(AttributionError, match=r"node_threshold must be in \(0, 1\]"):
            prune(graph, node_threshold=bad)
        with pytest.raises(AttributionError, match=r"edge_threshold must be in \(0, 1\]"):
            prune(graph, edge_threshold=bad)
    with pytest.raises(AttributionError, match="layer"):
        rm.intervene(ids, [Intervention(7, 1, 0, 1.0)], mode="constrained")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attribution_on_gpu_matches_cpu_and_bf16_rows_add_up():
    import copy

    rm, ids = case("llama", "jumprelu", True)
    cpu = attribute(ids, rm.clt, rm, verbose=False)
    sub = Subject(copy.deepcopy(rm.model).cuda())
    clt = copy.deepcopy(rm.clt).cuda()
    gpu = attribute(ids, clt, sub, verbose=False)
    torch.testing.assert_close(gpu.adjacency_matrix, cpu.adjacency_matrix, rtol=1e-3, atol=1e-5)
    bf = attribute(ids, clt, Subject(copy.deepcopy(rm.model).cuda().bfloat16()), verbose=False)
    rows = torch.cat([torch.arange(bf.n_features), torch.arange(bf.logit_slice.start, bf.n_nodes)])
    total = bf.adjacency_matrix[rows].sum(1) + bf.node_bias[rows]
    scale = bf.node_values[rows].abs().max()
    assert (total - bf.node_values[rows]).abs().max() <= 3e-2 * scale


def test_a_graph_written_by_earlier_code_still_loads():
    """tests/assets/graph-format1.pt: the graph of "The capital of France is" through a random TopK
    CLT on a tiny random Llama, written by the code of 2026-12-02 (commit 82d77a6), with what its
    pruning at (0.8, 0.98) and scores gave then. Today's loader reads it and prunes and scores it
    the same way."""
    import json
    from pathlib import Path

    assets = Path(__file__).parent / "assets"
    expected = json.loads((assets / "graph-format1-expected.json").read_text())
    g = Graph.from_pt(assets / "graph-format1.pt")
    p = prune(g, 0.8, 0.98)
    assert g.n_nodes == expected["n_nodes"]
    assert p.node_mask.nonzero().flatten().tolist() == expected["node_mask"]
    assert int(p.edge_mask.sum()) == expected["n_edges"]
    for k, v in scores(g, p).items():
        assert abs(float(v) - expected["scores"][k]) < 1e-6, k
