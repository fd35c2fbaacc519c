"""Why a head attends where it does, in the frozen replacement model: QK attribution and head loadings.

With attention patterns and norm denominators frozen, the residual stream entering layer m at
position p is an exact sum of position-local parts (`residual_parts`):

    resid_pre_m[p] = Σ_{(s,i) active at p, s<m} a_{s,i}[p] D^{(m)}_{s,i}     features (writes at s..m−1)
                   + Σ_{l<m} err_l[p]                                       error nodes
                   + E[p]                                                   the token
                   + Σ_{l<m, h} Γ_l[p] W_O^{l,h} z_{l,h}[p]                 earlier heads' outputs
                   + c[p]                                                   constants: decoder biases,
                                                                            attention output biases,
                                                                            position embeddings, BOS

and a head's query and key are affine in it (`clt.circuits.heads`): with the frozen 1/σ_p, Qwen 3's
frozen q/k-norm scale g = γ_q s_q[p, h] (else 1) and the rotation R_p,

    Q_u(p) = R_p (g ⊙ W_Q c_u(p) s_p),   Q_bias(p) = R_p (g ⊙ b_Q)        (the same for keys)
    C[u, v] = scaling · Q_u(p) · K_v(j)        Σ_{u,v} C[u, v] = S[p, j]   (pre-softcap) exactly.

Head loadings split a graph edge (source node → target node) at one attention layer m: the source's
perturbation reaches layer m's heads as Δz_{m,h} (their pre-projection outputs); the target's
gradient there is g_{m,h} = ∂target/∂z_{m,h}; L_h = Σ_q g_{m,h}[q] · Δz_{m,h}[q] is what head h
of layer m carries, and the bypass (everything that does not pass through layer m's attention) is
edge − Σ_h L_h. Both sides are computed in the frozen model (affine: exact).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

from ..circuits.heads import Heads
from ..errors import AttributionError, CircuitError
from .replacement import PromptContext, ReplacementModel

# ---------------------------------------------------------------------------------------------
# One frozen run that keeps each layer's resid_pre and each head's output


@dataclass
class AttentionRun:
    """The frozen model on a prompt's clean sources: per layer m, resid_pre [T, d] and the heads'
    outputs before the output projection z [T, H, D] (fp32)."""

    heads: Heads
    resid_pre: list[torch.Tensor]
    z: list[torch.Tensor]


def _scale(ctx: PromptContext, module) -> torch.Tensor:
    """A frozen norm's 1/σ for the prompt: [T, ...] (batch axis dropped)."""
    return ctx.freeze.scales[id(module)][0].float()


@torch.no_grad()
def attention_run(rm: ReplacementModel, ctx: PromptContext, heads: Heads | None = None) -> AttentionRun:
    heads = heads or Heads(rm.model, rm.subject.family_name)
    L = len(heads)
    resid: list = [None] * L
    z: list = [None] * L
    handles = []

    def keep_resid(m):
        return lambda _mod, args: resid.__setitem__(m, args[0][0].float())

    def keep_z(m):
        H, D = heads.n_heads, heads.head_dim
        return lambda _mod, args: z.__setitem__(m, args[0][0].float().reshape(-1, H, D))

    try:
        for m in range(L):
            handles.append(heads.pre_norms[m].register_forward_pre_hook(keep_resid(m)))
            handles.append(heads.out_projs[m].register_forward_pre_hook(keep_z(m)))
        rm.frozen_run(ctx, ctx.E[None], rm.mlp_outputs(ctx)[None])
    finally:
        for hd in handles:
            hd.remove()
    return AttentionRun(heads, resid, z)


# ---------------------------------------------------------------------------------------------
# Position-local sources of the residual stream


@dataclass
class Parts:
    """resid_pre of one layer at one position as labelled parts: Σ vectors = resid_pre[p]."""

    labels: list[tuple]  # ("feature", layer, pos, feat) | ("error", layer, pos) | ("token", pos)
    #                      | ("head", layer, head, pos) | ("constant", pos)
    vectors: torch.Tensor  # [n, d]


def _head_write(rm: ReplacementModel, ctx: PromptContext, run: AttentionRun, layer: int, p: int):
    """Each head's write to the residual at p ([H, d]) and the layer's constant write ([d])."""
    lh = run.heads[layer]
    out = torch.einsum("hdD,hD->hd", lh.W_O, run.z[layer][p])  # [H, d]
    bias = lh.b_O.clone()
    post = run.heads.post_norms[layer]
    if post is not None and lh.post_gain is not None:  # Gemma 2: γ ⊙ (Σ_h W_O z_h + b_O) · s_post[p]
        s = _scale(ctx, post)[p] * lh.post_gain
        out, bias = out * s, bias * s
    return out, bias


def residual_parts(rm: ReplacementModel, ctx: PromptContext, run: AttentionRun, layer: int, p: int) -> Parts:
    """The position-local parts of resid_pre of `layer` at position p (module docstring)."""
    clt, m = rm.clt, layer
    labels: list[tuple] = []
    vecs: list[torch.Tensor] = []
    d = rm.d_model
    const = torch.zeros(d, device=ctx.E.device)
    for s in range(m):
        feats = ctx.a[p, s].nonzero().flatten()
        if len(feats):
            w = clt.W_dec[s][feats][:, : m - s].float() / clt.output_scale[s:m].float()[None, :, None]
            vecs.append(ctx.a[p, s, feats, None].float() * w.sum(1))
            labels += [("feature", s, p, int(f)) for f in feats.tolist()]
    for l in range(m):
        vecs.append(ctx.err[p, l, None].float())
        labels.append(("error", l, p))
        const += (clt.b_dec[l].float() / clt.output_scale[l].float()) + ctx.bos_out[p, l].float()
    vecs.append(ctx.E[p, None].float())
    labels.append(("token", p))
    for l in range(m):
        out, bias = _head_write(rm, ctx, run, l, p)
        vecs.append(out)
        labels += [("head", l, h, p) for h in range(out.shape[0])]
        const += bias
    wpe = getattr(rm.base, "wpe", None)  # GPT-2's learned positions
    if wpe is not None:
        const += wpe.weight[p].float()
    vecs.append(const[None])
    labels.append(("constant", p))
    return Parts(labels, torch.cat(vecs))


# ---------------------------------------------------------------------------------------------
# QK attribution


@dataclass
class QKAttribution:
    """The score of head `head` of layer `layer` from query position `query` to key `key`, as a
    matrix of contributions: pairs[u, v] = scaling · Q_u · K_v over query-side sources u and key-side
    sources v (the last of each is the q/k bias). Σ pairs = score (pre-softcap)."""

    layer: int
    head: int
    query: int
    key: int
    query_sources: list[tuple]
    key_sources: list[tuple]
    pairs: torch.Tensor  # [n_q + 1, n_k + 1]
    score: float  # S[query, key] from the summed query and key (pre-softmax, pre-softcap)
    attention: float  # the frozen pattern A[query, key]
    magnitude: float  # scaling · Σ_{u,v,d} |Q_u[d] K_v[d]|: the scale of the sum's rounding

    @property
    def query_marginal(self) -> torch.Tensor:
        """[n_q + 1]: Σ_v pairs[u, v] = scaling · Q_u · k(key)."""
        return self.pairs.sum(1)

    @property
    def key_marginal(self) -> torch.Tensor:
        return self.pairs.sum(0)

    def top(self, n: int = 10) -> list[tuple[tuple, tuple, float]]:
        """The n largest nonzero |pairs| as (query source, key source, value)."""
        flat = self.pairs.flatten()
        idx = [i for i in flat.abs().argsort(descending=True)[:n].tolist() if flat[i] != 0]
        nk = self.pairs.shape[1]
        return [(self.query_sources[i // nk], self.key_sources[i % nk], float(flat[i])) for i in idx]


def _side(lh, run, ctx, parts: Parts, p: int, h: int, side: str, R) -> torch.Tensor:
    """Head-space vectors of each part and of the bias, rotated: [n + 1, D]."""
    g = lh.group(h) if side == "k" else h
    W, b = (lh.W_Q[h], lh.b_Q[h]) if side == "q" else (lh.W_K[g], lh.b_K[g])
    s_pre = _scale(ctx, run.heads.pre_norms[lh.layer])[p]  # [1]
    x = torch.cat([parts.vectors @ W.T * s_pre, b[None]])  # [n + 1, D]
    attn = run.heads.attn_modules[lh.layer]
    norm = getattr(attn, "q_norm" if side == "q" else "k_norm", None)
    if norm is not None:  # Qwen 3: frozen RMSNorm over the head dim, before the rotation
        gain = lh.q_gain if side == "q" else lh.k_gain
        x = x * gain * _scale(ctx, norm)[p, g]
    return x if R is None else x @ R[p].T


@torch.no_grad()
def qk_attribution(
    rm: ReplacementModel,
    ctx: PromptContext,
    layer: int,
    head: int,
    query: int,
    key: int,
    run: AttentionRun | None = None,
) -> QKAttribution:
    """QK attribution of one head's score at (query, key ≤ query) (module docstring)."""
    run = run or attention_run(rm, ctx)
    heads = run.heads
    lh = heads.head(layer, head)
    T = len(ctx.ids)
    if not 0 <= key <= query < T:
        raise CircuitError(f"positions (query {query}, key {key}): need 0 ≤ key ≤ query < {T}")
    R = heads.rotations(T)
    pq, pk = residual_parts(rm, ctx, run, layer, query), residual_parts(rm, ctx, run, layer, key)
    Q = _side(lh, run, ctx, pq, query, head, "q", R)
    K = _side(lh, run, ctx, pk, key, head, "k", R)
    pairs = lh.scaling * Q @ K.T
    q_all, k_all = Q.sum(0), K.sum(0)
    pattern = ctx.freeze.pattern(heads.attn_modules[layer], query, query + 1)[head, 0, key]
    return QKAttribution(
        layer,
        head,
        query,
        key,
        [*pq.labels, ("bias", "q")],
        [*pk.labels, ("bias", "k")],
        pairs,
        float(lh.scaling * q_all @ k_all),
        float(pattern),
        float(lh.scaling * (Q.abs() @ K.abs().T).sum()),
    )


# ---------------------------------------------------------------------------------------------
# Head loadings


def _z_hooks(heads: Heads, store: dict, grads: bool, block: set[int] | None = None):
    """Forward pre-hooks on every output projection: keep z per layer (and its gradient). In a
    forward-mode run, the layers in `block` drop z's tangent: the perturbation does not act through
    those layers' attention (the bypass of a head loading)."""
    handles = []
    for m, proj in enumerate(heads.out_projs):

        def hook(_mod, args, m=m):
            z = args[0]
            if block is not None and m in block:
                z = fwAD.unpack_dual(z).primal
            if grads:
                z = z * torch.ones((), dtype=z.dtype, device=z.device, requires_grad=True)
                z.retain_grad()
            store[m] = z
            return (z, *args[1:])

        handles.append(proj.register_forward_pre_hook(hook))
    return handles


def source_perturbations(rm: ReplacementModel, ctx: PromptContext, graph, nodes: list[int]):
    """For source nodes of a graph: (δE [n, T, d], δmlp [n, T, L, d]), what each one adds to the
    frozen model's inputs (a feature: its value times its decoder rows)."""
    L, T, d = rm.n_layers, len(ctx.ids), rm.d_model
    clt = rm.clt
    dE = torch.zeros(len(nodes), T, d, device=ctx.E.device)
    dM = torch.zeros(len(nodes), T, L, d, device=ctx.E.device)
    for b, node in enumerate(nodes):
        if node < graph.n_features:
            s, p, f = graph.feature_of(node)
            dM[b, p, s:] = (
                ctx.a[p, s, f].float() * clt.W_dec[s][f].float() / clt.output_scale[s:, None].float()
            )
        elif node < graph.error_slice.stop:
            layer, p = divmod(node - graph.n_features, graph.n_pos)
            dM[b, p, layer] = ctx.err[p, layer].float()
        elif node < graph.token_slice.stop:
            p = node - graph.token_slice.start
            dE[b, p] = ctx.E[p].float()
        else:
            raise AttributionError(f"node {node} ({graph.describe(node)}) is not a source node")
    return dE, dM


def _target_objective(rm: ReplacementModel, ctx: PromptContext, graph, nodes, xs, hidden):
    """Σ_b (the value of target node nodes[b] in batch element b)."""
    from .adjacency import feature_vectors

    obj = torch.zeros((), device=ctx.E.device)
    for b, node in enumerate(nodes):
        if node < graph.n_features:
            layer, p, f = graph.feature_of(node)
            vec = feature_vectors(rm, torch.tensor([[layer, p, f]], device=ctx.E.device))[0]
            obj = obj + (xs[layer][b, p].float() * vec).sum()
        elif node >= graph.logit_slice.start:
            k = node - graph.logit_slice.start
            vec = rm.logit_vectors(graph.logit_tokens[k : k + 1].to(ctx.E.device))[0]
            obj = obj + (hidden[b, -1].float() * vec).sum()
        else:
            raise AttributionError(f"node {node} ({graph.describe(node)}) is not a target node")
    return obj


def target_gradients(rm, ctx, graph, nodes: list[int], heads: Heads) -> torch.Tensor:
    """g [n, L, T, H, D]: ∂target/∂z of every layer's heads, per target node."""
    n, L = len(nodes), len(heads)
    store: dict = {}
    handles = _z_hooks(heads, store, grads=True)
    try:
        with torch.enable_grad():
            E = ctx.E[None].expand(n, -1, -1)
            xs, hidden = rm.frozen_run(ctx, E, rm.mlp_outputs(ctx)[None])
            _target_objective(rm, ctx, graph, nodes, xs, hidden).backward()
    finally:
        for hd in handles:
            hd.remove()
    H, D = heads.n_heads, heads.head_dim
    grads = [torch.zeros_like(store[m]) if store[m].grad is None else store[m].grad for m in range(L)]
    return torch.stack([gr.float().reshape(n, -1, H, D) for gr in grads], 1)  # (no path: zero)


@torch.no_grad()
def source_deltas(rm, ctx, graph, nodes: list[int], heads: Heads) -> torch.Tensor:
    """Δz [n, L, T, H, D]: how each source node moves every layer's heads. The frozen model is
    affine, so this is its derivative along the source's perturbation: one forward pass with
    forward-mode tangents (exact; no difference of two runs to lose digits to)."""
    dE, dM = source_perturbations(rm, ctx, graph, nodes)
    n, L = len(nodes), len(heads)
    store: dict = {}
    handles = _z_hooks(heads, store, grads=False)
    try:
        with fwAD.dual_level():
            E = fwAD.make_dual(ctx.E[None].expand(n, -1, -1).contiguous(), dE)
            M = fwAD.make_dual(rm.mlp_outputs(ctx)[None].expand(n, -1, -1, -1).contiguous(), dM)
            rm.frozen_run(ctx, E, M)
            tangents = [fwAD.unpack_dual(store[m]).tangent for m in range(L)]
    finally:
        for hd in handles:
            hd.remove()
    H, D = heads.n_heads, heads.head_dim
    z = [
        torch.zeros(n, len(ctx.ids), H, D, device=dE.device) if t is None else t.float().reshape(n, -1, H, D)
        for t in tangents
    ]
    return torch.stack(z, 1)


@dataclass
class HeadLoadings:
    """Per edge (target node, source node) and attention layer m: loadings [n, L, H] (what head h of
    layer m carries of the edge) and bypass [n, L] (the rest); Σ_h + bypass = edge at every m."""

    edges: torch.Tensor  # [n, 2] (target node, source node)
    loadings: torch.Tensor  # [n, L, H]
    bypass: torch.Tensor  # [n, L]
    edge: torch.Tensor  # [n] the graph's adjacency entries


def head_loadings(
    rm: ReplacementModel,
    ctx: PromptContext,
    graph,
    edges: torch.Tensor,
    heads: Heads | None = None,
    chunk: int = 64,
) -> HeadLoadings:
    """Head loadings of the given edges [n, 2] (target node, source node) of `graph` (built on
    this prompt). Cost: one batched backward per chunk of targets, one batched forward per chunk
    of sources."""
    heads = heads or Heads(rm.model, rm.subject.family_name)
    edges = torch.as_tensor(edges, dtype=torch.long).reshape(-1, 2)
    targets = sorted(set(edges[:, 0].tolist()))
    sources = sorted(set(edges[:, 1].tolist()))

    def chunked(fn, nodes):  # fn over chunks of nodes, concatenated ([n, L, T, H, D])
        return torch.cat(
            [fn(rm, ctx, graph, nodes[i : i + chunk], heads) for i in range(0, len(nodes), chunk)]
        )

    g = chunked(target_gradients, targets) if targets else None
    dz = chunked(source_deltas, sources) if sources else None
    ti = {t: i for i, t in enumerate(targets)}
    si = {s: i for i, s in enumerate(sources)}
    n, L, H = len(edges), len(heads), heads.n_heads
    load = torch.zeros(n, L, H)
    for e, (t, s) in enumerate(edges.tolist()):
        assert g is not None and dz is not None
        load[e] = (g[ti[t]] * dz[si[s]]).sum((1, 3)).cpu()  # Σ over positions and head dims
    edge = graph.edge_weights(edges[:, 0], edges[:, 1]).float()
    return HeadLoadings(edges, load, edge[:, None] - load.sum(-1), edge)


def attention_summary(
    rm: ReplacementModel, graph, ctx: PromptContext, pruned: Any, n_qk: int = 8, top_pairs: int = 12
) -> dict:
    """What `attribute(..., attention=True)` stores in `graph.attention`: head loadings of the
    pruned graph's cross-position edges, and the QK attribution (top pairs and marginals) of the
    heads that carry the most of them, at the edge's (target position, source position)."""
    heads = Heads(rm.model, rm.subject.family_name)
    keep = pruned.node_mask
    rows = pruned.edge_rows & keep[graph.row_nodes][:, None] & keep[None, :]
    cross = cross_position_edges(graph, rows)
    pos = _positions(graph)
    if not cross:
        L, H = len(heads), heads.n_heads
        empty = torch.zeros(0, 2, dtype=torch.long)
        return {"edges": empty, "loadings": torch.zeros(0, L, H), "bypass": torch.zeros(0, L), "qk": []}
    hl = head_loadings(rm, ctx, graph, torch.tensor(cross), heads)
    run = attention_run(rm, ctx, heads)
    # the (layer, head, query, key) carrying the most |loading| over the cross-position edges
    weight: dict[tuple[int, int, int, int], float] = {}
    for e, (t, s) in enumerate(cross):
        for m, h in (hl.loadings[e].abs() > 0).nonzero().tolist():
            site = (m, h, pos[t], pos[s])
            weight[site] = weight.get(site, 0.0) + float(hl.loadings[e, m, h].abs())
    qk = []
    for m, h, q, k in sorted(weight, key=weight.__getitem__, reverse=True)[:n_qk]:
        a = qk_attribution(rm, ctx, m, h, q, k, run)
        qk.append(
            {
                "layer": m,
                "head": h,
                "query": q,
                "key": k,
                "score": a.score,
                "attention": a.attention,
                "top_pairs": [[list(u), list(v), w] for u, v, w in a.top(top_pairs)],
                "query_top": _top_marginal(a.query_sources, a.query_marginal, top_pairs),
                "key_top": _top_marginal(a.key_sources, a.key_marginal, top_pairs),
            }
        )
    return {"edges": hl.edges, "loadings": hl.loadings, "bypass": hl.bypass, "qk": qk}


def cross_position_edges(graph, mask: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """(target, source) node pairs of the graph's nonzero edges (within `mask`, if given: [R, N]
    over the graph's edge rows) whose positions differ: a feature or logit target, a feature,
    error or token source."""
    A = graph.edge_rows
    nz = A != 0 if mask is None else (A != 0) & mask
    nz[:, graph.logit_slice.start :] = False
    pos = torch.tensor(_positions(graph))
    r, s = nz.nonzero(as_tuple=True)
    t = graph.row_nodes[r]
    cross = pos[t] != pos[s]
    return list(zip(t[cross].tolist(), s[cross].tolist()))


def _top_marginal(labels, values: torch.Tensor, n: int) -> list:
    idx = [i for i in values.abs().argsort(descending=True)[:n].tolist() if values[i] != 0]
    return [[list(labels[i]), float(values[i])] for i in idx]


def _positions(graph) -> list[int]:
    """The position of every node of a graph (logits: the last)."""
    out = []
    for i in range(graph.n_nodes):
        if i < graph.n_features:
            out.append(graph.feature_of(i)[1])
        elif i < graph.error_slice.stop:
            out.append((i - graph.n_features) % graph.n_pos)
        elif i < graph.token_slice.stop:
            out.append(i - graph.token_slice.start)
        else:
            out.append(int(graph.info.get("target_position", graph.n_pos - 1)))
    return out
