"""Attention-causal communication (Seed 002): why each head attends where it does, traced back
through the residual stream into a circuit, merged over prompts and pruned by intervention.

A *firing* is (layer m, head h, query p, key j). With the prompt's norm scales frozen (1/σ per
position, Qwen 3's q/k-norm scales c), the score is a bilinear form of the normalised residuals
x̃ = x/σ plus bias terms; per query-key offset Δ = p − j (RoPE) its matrix is

    Ω_Δ = Wqᵀ R_Δᵀ Wk = U Σ Vᵀ   (rank D; from thin QRs Wqᵀ = Q_a R_a, Wkᵀ = Q_b R_b and the SVD of the
                                   D×D core R_a R_Δᵀ R_bᵀ: exact, no d×d SVD)
    S[p, j'] = scaling c [Σ_k σ_k (u_kᵀ x̃_p)(v_kᵀ x̃_j') + β(j')]       (β: the bias terms)

Softmax ignores what all keys share, so the target is the relative score r = S[p, j] − mean_{j'≠j}
S[p, j'] over the other visible keys, split per singular direction:

    t_k = scaling [c_j σ_k (u_kᵀ x̃_p)(v_kᵀ x̃_j) − mean_{j'} c_j' σ'_k (u'_kᵀ x̃_p)(v'_kᵀ x̃_j')]
          (primes: the SVD of Ω at the offset p − j')
    r   = Σ_k t_k + t_bias                                             (each key uses its own offset's Ω)

The few directions S carrying the sum (the smallest prefix of t sorted descending with Σ_S ≥ τ Σ_k t_k,
τ = 1) are the *signals*. The residual at each position is an exact sum of components (`Trace`):
the embedding, each earlier MLP's output, each earlier head's output split by its key position,
and the attention biases. Each component's share of Σ_S t_k is linear in it, on the query side
(components at p) and on the key side (components at j and at the other keys, as above):

    C^q_c = Σ_{k∈S} scaling [c_j σ_k (u_kᵀ x̃_c(p))(v_kᵀ x̃_j) − mean_{j'} (…)],   Σ_c C^q_c = Σ_{k∈S} t_k

Tracing (`trace_prompt`) starts from the heads whose direct effect on the task's logit difference is
largest, keeps for each firing the components that first cover `upstream` (70%) of its total, adds
edges (component → firing, type "d" query side, "s" key side) and recurses into upstream heads.
Firings below uniform attention (A[p, j] < 1/(p + 1)) or at p = 0 are not traced. `merge` unites
the prompts' graphs by role ((layer, head, query role, key role)), `prune` keeps the edges whose
signal, subtracted from the receiving head's query (or key) alone in the live model, moves the logit
difference by ≥ `threshold` (0.2) on average, and `cytoscape` exports the circuit.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CircuitError
from ..norms import final_norm
from ..subject import FAMILIES, _getattr_path
from .heads import Heads, inv_sigma
from .tasks import TaskPrompt

PATCH_IMPL = "clt_pinpoint"


# ---------------------------------------------------------------------------------------------
# One prompt: the live run's residual streams, patterns and norm scales, and its components


class Trace:
    """A prompt's clean forward pass, with its residual streams split into components."""

    def __init__(self, model: Any, heads: Heads, ids: torch.Tensor):
        self.model, self.heads, self.ids = model, heads, ids
        fam = FAMILIES[heads.family]
        L, H = len(heads), heads.n_heads
        self.T = T = len(ids)
        resid: list = [None] * L
        mlp: list = [None] * L
        attn_out: list = [None] * L
        final: list = [None]
        handles = []
        norm = final_norm(model)
        if norm is None:
            raise CircuitError(f"{type(model).__name__} has no final norm before its unembedding")
        self.final_norm = norm
        mlp_path, where = fam.hooks["mlp_out"]
        try:
            for m, layer in enumerate(heads.layers):
                handles.append(
                    heads.pre_norms[m].register_forward_pre_hook(
                        lambda _mod, a, m=m: resid.__setitem__(m, a[0][0].float())
                    )
                )
                handles.append(
                    _getattr_path(layer, mlp_path).register_forward_hook(
                        lambda _mod, a, out, m=m: mlp.__setitem__(m, out[0].float())
                    )
                )
                post = heads.post_norms[m]
                if post is not None:
                    handles.append(
                        post.register_forward_pre_hook(
                            lambda _mod, a, m=m: attn_out.__setitem__(m, a[0][0].float())
                        )
                    )
            handles.append(
                self.final_norm.register_forward_pre_hook(
                    lambda _mod, a: final.__setitem__(0, a[0][0].float())
                )
            )
            cfg = model.config
            old, cfg._attn_implementation = cfg._attn_implementation, "eager"
            try:
                with torch.no_grad():
                    out = model(
                        input_ids=ids[None].to(next(model.parameters()).device),
                        output_attentions=True,
                        use_cache=False,
                    )
            finally:
                cfg._attn_implementation = old
        finally:
            for hd in handles:
                hd.remove()
        self.resid_pre, self.mlp_out, self.final = resid, mlp, final[0]
        self.patterns = [a[0].float() for a in out.attentions]  # L × [H, T, T]
        self.logits = out.logits[0].float()
        dev = self.final.device
        self.s_pre = [inv_sigma(r, lh.centred, lh.eps)[:, 0] for r, lh in zip(resid, heads.heads)]  # L × [T]
        # Γ_l[p]: Gemma 2's post-attention norm as a per-position diagonal (1 elsewhere): L × [T, d]
        self.gamma = []
        for m, lh in enumerate(heads.heads):
            if heads.post_norms[m] is None or lh.post_gain is None:
                self.gamma.append(torch.ones(T, heads.d_model, device=dev))
            else:
                s = inv_sigma(attn_out[m], False, lh.post_eps)
                self.gamma.append(s * lh.post_gain)
        # Qwen 3: the q/k-norm scale per (position, head) of the clean run, else 1
        self.c_q: list[torch.Tensor] = []
        self.c_k: list[torch.Tensor] = []
        for m, lh in enumerate(heads.heads):
            xs = resid[m] * self.s_pre[m][:, None]
            for W, b, gain, store in (
                (lh.W_Q, lh.b_Q, lh.q_gain, self.c_q),
                (lh.W_K, lh.b_K, lh.k_gain, self.c_k),
            ):
                if gain is None:
                    store.append(torch.ones(T, W.shape[0], device=dev))
                else:
                    pre = torch.einsum("nDd,td->tnD", W, xs) + b
                    store.append(torch.rsqrt(pre.pow(2).mean(-1) + lh.qk_eps))
        # per layer l: what each head writes per key position before the pattern and Γ: [H, T, d]
        self.head_values = []
        for m, lh in enumerate(heads.heads):
            xs = resid[m] * self.s_pre[m][:, None]
            v = torch.einsum("gDd,td->gtD", lh.W_V, xs).repeat_interleave(H // lh.n_kv, 0)  # [H, T, D]
            self.head_values.append(torch.einsum("hdD,htD->htd", lh.W_O, v))
        # per layer: the attention block's constant write b_O + Σ_h W_O^h b_V (pattern rows sum to 1)
        self.attn_bias = []
        for lh in heads.heads:
            bv = lh.b_V.repeat_interleave(H // lh.n_kv, 0)  # [H, D]
            self.attn_bias.append(lh.b_O + torch.einsum("hdD,hD->d", lh.W_O, bv))
        emb = model.get_input_embeddings()(ids.to(dev)).float()
        wpe = getattr(getattr(model, model.base_model_prefix), "wpe", None)
        self.embedding = emb + (wpe.weight[:T].float() if wpe is not None else 0)

    # -- components ------------------------------------------------------------------------------
    def labels(self, m: int) -> list[tuple]:
        """The components of resid_pre of layer m (m = L: the final residual), in order:
        ("emb",), ("mlp", l), ("bias",), then ("head", l, h, k) for l < m, every head and key k."""
        H, T = self.heads.n_heads, self.T
        return [
            ("emb",),
            *[("mlp", l) for l in range(m)],
            ("bias",),
            *[("head", l, h, k) for l in range(m) for h in range(H) for k in range(T)],
        ]

    def components(self, m: int, p: int) -> torch.Tensor:
        """[n, d] in the order of `labels(m)`; they sum to resid_pre_m[p] (un-normalised)."""
        bias = sum(
            (self.gamma[l][p] * self.attn_bias[l] for l in range(m)), torch.zeros_like(self.embedding[p])
        )
        rows = [self.embedding[p][None], *[self.mlp_out[l][p][None] for l in range(m)], bias[None]]
        for l in range(m):
            A = self.patterns[l][:, p]  # [H, T]
            rows.append(
                (A[..., None] * self.head_values[l] * self.gamma[l][p]).reshape(-1, self.heads.d_model)
            )
        return torch.cat(rows)

    def resid(self, m: int) -> torch.Tensor:
        return self.final if m == len(self.heads) else self.resid_pre[m]


# ---------------------------------------------------------------------------------------------
# The score of a firing, per singular direction


@dataclass
class Omega:
    """SVD of one head's bilinear form at one offset: Ω = U diag(S) Vᵀ, U, V: [d, D]."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


class OmegaCache:
    def __init__(self, heads: Heads, T: int):
        self.heads = heads
        self.R = heads.rotations(T)
        self.cache: dict[tuple[int, int, int], Omega] = {}
        self.qr: dict[tuple[int, int], tuple] = {}

    def __call__(self, m: int, h: int, delta: int) -> Omega:
        key = (m, h, delta if self.R is not None else 0)
        if key not in self.cache:
            lh = self.heads[m]
            if (m, h) not in self.qr:
                self.qr[(m, h)] = (
                    *torch.linalg.qr(lh.Wq(h).T.double()),
                    *torch.linalg.qr(lh.Wk(h).T.double()),
                )
            Qa, Ra, Qb, Rb = self.qr[(m, h)]
            Rd = torch.eye(Ra.shape[0], dtype=torch.float64) if self.R is None else self.R[delta].double()
            Us, S, Vh = torch.linalg.svd(Ra @ Rd.T @ Rb.T)
            self.cache[key] = Omega((Qa @ Us).float(), S.float(), (Qb @ Vh.T).float())
        return self.cache[key]

    def bias_terms(self, m: int, h: int, delta: int, xq: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        """β = x̃_qᵀ Wqᵀ R_Δᵀ b_k + b_qᵀ R_Δᵀ Wk x̃_k + b_qᵀ R_Δᵀ b_k (biases with the q/k gains)."""
        lh = self.heads[m]
        bq = lh.b_Q[h] * (lh.q_gain if lh.q_gain is not None else 1)
        bk = lh.b_K[lh.group(h)] * (lh.k_gain if lh.k_gain is not None else 1)
        Rd = torch.eye(len(bq)) if self.R is None else self.R[delta]
        q, k = lh.Wq(h) @ xq, lh.Wk(h) @ xk
        return q @ Rd.T @ bk + bq @ Rd.T @ k + bq @ Rd.T @ bk


@dataclass
class Firing:
    """The decomposition of one firing's relative score."""

    layer: int
    head: int
    query: int
    key: int
    attention: float
    relative: float  # r = S[p, j] − mean over the other visible keys
    terms: torch.Tensor  # [D] t_k
    bias: float  # t_bias (Σ terms + bias = r)
    selected: list[int]  # the signal's singular directions
    others: list[int]  # the other visible keys j'


def visible_keys(heads: Heads, m: int, p: int, T: int) -> list[int]:
    mask = heads[m].mask(T)
    return mask[p].nonzero().flatten().tolist()


def decompose(tr: Trace, om: OmegaCache, m: int, h: int, p: int, j: int, tau: float = 1.0) -> Firing:
    """r of firing (m, h, p, j) per singular direction, and the selected directions (module doc)."""
    lh = tr.heads.head(m, h)
    keys = visible_keys(tr.heads, m, p, tr.T)
    if j not in keys:
        raise CircuitError(f"key {j} is not visible from query {p} in layer {m}")
    others = [k for k in keys if k != j]
    if not others:
        raise CircuitError(f"query {p} of layer {m} sees only key {j}: its relative score is undefined")
    g = lh.group(h)
    xs = tr.resid_pre[m] * tr.s_pre[m][:, None]

    def per_key(k):  # [D] σ_k (u_kᵀ x̃_p)(v_kᵀ x̃_k) · scaling · c, and the bias term
        o = om(m, h, p - k)
        c = lh.scaling * tr.c_q[m][p, h] * tr.c_k[m][k, g]
        return c * o.S * (o.U.T @ xs[p]) * (o.V.T @ xs[k]), c * om.bias_terms(m, h, p - k, xs[p], xs[k])

    tj, bj = per_key(j)
    rest = [per_key(k) for k in others]
    terms = tj - torch.stack([t for t, _ in rest]).mean(0)
    bias = bj - torch.stack([b for _, b in rest]).mean()
    total = float(terms.sum())
    order = terms.argsort(descending=True).tolist()
    selected: list[int] = []
    if total > 0:
        acc = 0.0
        for k in order:
            selected.append(k)
            acc += float(terms[k])
            if round(acc, 5) >= round(tau * total, 5):
                break
    A = float(tr.patterns[m][h, p, j])
    return Firing(m, h, p, j, A, float(terms.sum() + bias), terms, float(bias), selected, others)


def contributions(
    tr: Trace, om: OmegaCache, f: Firing
) -> tuple[list[tuple], torch.Tensor, list[tuple], torch.Tensor]:
    """(query labels, C^q [n], key labels, C^k [n']): each component's share of Σ_{k∈S} t_k on
    the query side (components at p) and on the key side (at j and the other keys)."""
    m, h, p, j = f.layer, f.head, f.query, f.key
    lh = tr.heads[m]
    g = lh.group(h)
    S = torch.tensor(f.selected, dtype=torch.long)
    xs = tr.resid_pre[m] * tr.s_pre[m][:, None]
    n_others = len(f.others)

    def parts(k):  # for key k: (the query-side direction w_q [d], the key-side direction w_k [d])
        o = om(m, h, p - k)
        c = lh.scaling * tr.c_q[m][p, h] * tr.c_k[m][k, g]
        sv = c * o.S[S]
        wq = o.U[:, S] @ (sv * (o.V[:, S].T @ xs[k]))  # Σ_k σ (v_kᵀ x̃_k) u_k
        wk = o.V[:, S] @ (sv * (o.U[:, S].T @ xs[p]))
        return wq, wk

    wq_j, wk_j = parts(j)
    others = [parts(k) for k in f.others]
    wq = wq_j - sum(w for w, _ in others) / n_others
    labels = tr.labels(m)
    Cq = (tr.components(m, p) * tr.s_pre[m][p]) @ wq
    Ck = (tr.components(m, j) * tr.s_pre[m][j]) @ wk_j
    for k, (_, wk) in zip(f.others, others):
        Ck = Ck - (tr.components(m, k) * tr.s_pre[m][k]) @ wk / n_others
    return labels, Cq, labels, Ck


def upstream(values: torch.Tensor, fraction: float) -> list[int]:
    """Indices of the largest contributions, in order, until they first exceed `fraction` of the
    total (nothing when the total is not positive)."""
    total = float(values.sum())
    if total <= 0:
        return []
    out, acc = [], 0.0
    for i in values.argsort(descending=True).tolist():
        if values[i] <= 0:
            break
        out.append(i)
        acc += float(values[i])
        if acc > fraction * total:
            break
    return out


# ---------------------------------------------------------------------------------------------
# Tracing one prompt


@dataclass
class PromptGraph:
    """The traced graph of one prompt. Nodes: ("AH", m, h, p, j) firings, ("MLP", l, p),
    ("EMB", p), ("BIAS", p), ("LD",) the logit difference. Edges: (u, v, type) -> weight, type
    "d" (query side), "s" (key side) or "root" (a seed's direct effect on the logit difference).
    `signals[(u, v, type)]` = (layer, head, position, side, component vector x̃_c [d], basis [d, r])
    for the intervention."""

    prompt: TaskPrompt
    logit_diff: float
    edges: dict[tuple, float] = field(default_factory=dict)
    signals: dict[tuple, tuple] = field(default_factory=dict)
    firings: int = 0


def metric_direction(tr: Trace, tp: TaskPrompt) -> torch.Tensor:
    """d(logit diff)/d(final residual before the norm), with the final norm's 1/σ frozen: [d]."""
    from .weights import norm_affine

    W = tr.model.get_output_embeddings().weight.float()
    v = W[tp.correct].mean(0) - W[tp.wrong].mean(0)
    gain, _, centred, eps = norm_affine(tr.final_norm)
    s = inv_sigma(tr.final[-1], centred, eps)[0]
    w = v * gain * s
    return w - w.mean() if centred else w


def _node(label: tuple, p: int) -> tuple:
    kind = label[0]
    if kind == "emb":
        return ("EMB", p)
    if kind == "mlp":
        return ("MLP", label[1], p)
    if kind == "bias":
        return ("BIAS", p)
    return ("AH", label[1], label[2], p, label[3])  # the upstream head's firing at this position


def trace_prompt(
    tr: Trace,
    tp: TaskPrompt,
    seed_fraction: float = 0.5,
    upstream_fraction: float = 0.7,
    max_firings: int = 200,
    tau: float = 1.0,
) -> PromptGraph:
    """Seeds: the head components (head, key position) with the largest direct effect on the logit
    difference at END, until they cover `seed_fraction` of the positive total; then the recursion of
    the module docstring, at most `max_firings` firings."""
    L, T = len(tr.heads), tr.T
    om = OmegaCache(tr.heads, T)
    end = T - 1
    w = metric_direction(tr, tp)
    labels = tr.labels(L)
    direct = tr.components(L, end) @ w  # [n]
    ld = float(tr.logits[end, tp.correct].mean() - tr.logits[end, tp.wrong].mean())
    g = PromptGraph(tp, ld)
    heads_only = torch.tensor([lab[0] == "head" for lab in labels])
    seeds = upstream(torch.where(heads_only, direct, torch.zeros_like(direct)), seed_fraction)
    queue = []
    for i in seeds:
        node = _node(labels[i], end)
        g.edges[(node, ("LD",), "root")] = float(direct[i])
        queue.append(node)
    done = set()
    while queue and g.firings < max_firings:
        node = queue.pop(0)
        if node in done or node[0] != "AH":
            continue
        done.add(node)
        _, m, h, p, j = node
        if m == 0 or p == 0 or float(tr.patterns[m][h, p, j]) < 1 / (p + 1) or j == p and p == 0:
            continue
        try:
            f = decompose(tr, om, m, h, p, j, tau)
        except CircuitError:
            continue
        if not f.selected:
            continue
        g.firings += 1
        lq, Cq, lk, Ck = contributions(tr, om, f)
        for side, labs, C, pos in (("d", lq, Cq, p), ("s", lk, Ck, j)):
            o = om(m, h, p - j)
            basis = (o.U if side == "d" else o.V)[:, f.selected]
            for i in upstream(C, upstream_fraction):
                u = _node(labs[i], pos)
                g.edges[(u, node, side)] = g.edges.get((u, node, side), 0.0) + float(C[i])
                vec = tr.components(m, pos)[i] * tr.s_pre[m][pos]
                g.signals[(u, node, side)] = (m, h, pos, side, vec, basis)
                if u[0] == "AH" and u not in done:
                    queue.append(u)
    return g


# ---------------------------------------------------------------------------------------------
# Interventions in the live model: subtract a signal from one head's query or key input


_PATCHES: list[dict] = [{}]  # id(attention module) -> [(batch, head, side, position, rotated delta [D])]


def _patched_attention(module, query, key, value, attention_mask, **kwargs):
    patches = _PATCHES[-1].get(id(module), [])
    H = query.shape[1]
    n_rep = H // key.shape[1]
    key = key.repeat_interleave(n_rep, 1).clone()
    value = value.repeat_interleave(n_rep, 1)
    query = query.clone()
    for b, h, side, p, delta in patches:
        (query if side == "d" else key)[b, h, p] -= delta.to(query.dtype)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
    w = query @ key.transpose(-1, -2) * scaling
    softcap = kwargs.get("softcap")
    if softcap:
        w = softcap * torch.tanh(w / softcap)
    if attention_mask is not None:
        w = w + attention_mask[..., : key.shape[-2]]
    w = torch.softmax(w.float(), -1).to(value.dtype)
    return (w @ value).transpose(1, 2).contiguous(), w


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(PATCH_IMPL, _patched_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PATCH_IMPL, eager_mask)


def signal_delta(tr: Trace, m: int, h: int, pos: int, side: str, vec: torch.Tensor, basis: torch.Tensor):
    """The change of head h's rotated query (side "d") or key ("s") at `pos` when the projection of
    the normalised component `vec` on `basis` is removed from its input: [D]."""
    lh = tr.heads[m]
    sig = basis @ (basis.T @ vec)
    if side == "d":
        d = lh.Wq(h) @ sig * tr.c_q[m][pos, h]
    else:
        d = lh.Wk(h) @ sig * tr.c_k[m][pos, lh.group(h)]
    R = tr.heads.rotations(tr.T)
    return d if R is None else R[pos] @ d


@torch.no_grad()
def patched_logit_diffs(tr: Trace, tp: TaskPrompt, runs: list[list[tuple]], batch: int = 16) -> list[float]:
    """The live model's logit difference at END for each run of patches (signals subtracted), runs
    batched. A patch: (layer, head, position, side, delta [D])."""
    _register()
    out: list[float] = []
    cfg = tr.model.config
    dev = tr.final.device
    for i in range(0, len(runs), batch):
        chunk = runs[i : i + batch]
        by_module: dict[int, list] = defaultdict(list)
        for b, patches in enumerate(chunk):
            for m, h, pos, side, delta in patches:
                by_module[id(tr.heads.attn_modules[m])].append((b, h, side, pos, delta))
        old = cfg._attn_implementation
        _PATCHES.append(dict(by_module))
        try:
            cfg._attn_implementation = PATCH_IMPL
            ids = tr.ids[None].expand(len(chunk), -1).to(dev)
            logits = tr.model(input_ids=ids, use_cache=False).logits[:, -1].float()
        finally:
            cfg._attn_implementation = old
            _PATCHES.pop()
        out += (logits[:, tp.correct].mean(1) - logits[:, tp.wrong].mean(1)).tolist()
    return out


# ---------------------------------------------------------------------------------------------
# Merging prompts, pruning by intervention, export


def role_of(tp: TaskPrompt, pos: int) -> str:
    for r, p in tp.roles.items():
        if p == pos:
            return r
    for r, p in tp.roles.items():
        if p + 1 == pos:
            return f"{r}+1"
    return "BOS" if pos == 0 else "other"


def merged_node(tp: TaskPrompt, node: tuple) -> tuple:
    kind = node[0]
    if kind == "AH":
        return ("AH", node[1], node[2], role_of(tp, node[3]), role_of(tp, node[4]))
    if kind == "MLP":
        return ("MLP", node[1], role_of(tp, node[2]))
    if kind in ("EMB", "BIAS"):
        return (kind, role_of(tp, node[1]))
    return node


@dataclass
class Circuit:
    """Edges (u, v, type) of role-level nodes with their mean weight over the traced prompts, the
    prompts each appeared in, and (after `prune`) the mean change of the logit difference when its
    signal is removed."""

    edges: dict[tuple, float]
    appeared: dict[tuple, list[int]]
    effect: dict[tuple, float] = field(default_factory=dict)
    n_prompts: int = 0

    def nodes(self) -> set:
        return {x for (u, v, _) in self.edges for x in (u, v)}


def merge(graphs: list[PromptGraph]) -> Circuit:
    edges: dict[tuple, float] = defaultdict(float)
    appeared: dict[tuple, list[int]] = defaultdict(list)
    for i, g in enumerate(graphs):
        seen = set()
        for (u, v, t), w in g.edges.items():
            e = (merged_node(g.prompt, u), merged_node(g.prompt, v), t)
            edges[e] += w / len(graphs)
            if e not in seen:
                appeared[e].append(i)
                seen.add(e)
    return Circuit(dict(edges), dict(appeared), n_prompts=len(graphs))


def _edge_patches(trace: Trace, g: PromptGraph, e: tuple) -> list[tuple]:
    out = []
    for (u, v, t), (m, h, pos, side, vec, basis) in g.signals.items():
        if (merged_node(g.prompt, u), merged_node(g.prompt, v), t) == e:
            out.append((m, h, pos, side, signal_delta(trace, m, h, pos, side, vec, basis)))
    return out


def prune(
    circuit: Circuit,
    traces: list[Trace],
    graphs: list[PromptGraph],
    threshold: float = 0.2,
    min_prompts: int | None = None,
    progress: bool = True,
) -> Circuit:
    """Keep the root edges and the edges that appeared in ≥ min_prompts prompts (default: 30% of
    them) whose signal removal changes the logit difference by ≥ threshold on average; then only
    what is connected to the root."""
    from tqdm.auto import tqdm

    need = max(1, math.ceil(0.3 * circuit.n_prompts)) if min_prompts is None else min_prompts
    keep: dict[tuple, float] = {e: w for e, w in circuit.edges.items() if e[2] == "root"}
    todo = [e for e in circuit.edges if e[2] != "root" and len(circuit.appeared[e]) >= need]
    deltas: dict[tuple, list[float]] = defaultdict(list)
    for i in tqdm(range(len(graphs)), desc="interventions", unit="prompt", disable=not progress):
        mine = [e for e in todo if i in circuit.appeared[e]]
        runs = [_edge_patches(traces[i], graphs[i], e) for e in mine]
        for e, ld in zip(mine, patched_logit_diffs(traces[i], graphs[i].prompt, runs)):
            deltas[e].append(ld - graphs[i].logit_diff)
    effect = {e: sum(d) / len(d) for e, d in deltas.items()}
    keep |= {e: circuit.edges[e] for e in todo if abs(effect[e]) >= threshold}
    # connected to the root: walk backwards from ("LD",)
    into: dict[tuple, list[tuple]] = defaultdict(list)
    for e in keep:
        into[e[1]].append(e)
    reach, stack, kept = {("LD",)}, [("LD",)], {}
    while stack:
        v = stack.pop()
        for e in into[v]:
            kept[e] = keep[e]
            if e[0] not in reach:
                reach.add(e[0])
                stack.append(e[0])
    return Circuit(
        kept,
        {e: circuit.appeared[e] for e in kept},
        {e: effect[e] for e in kept if e in effect},
        circuit.n_prompts,
    )


def circuit_effect(circuit: Circuit, traces: list[Trace], graphs: list[PromptGraph], seed: int = 0) -> dict:
    """The logit difference with every signal of the circuit removed at once, against the clean
    one, and a control: the same components projected on random directions of the same rank."""
    g0 = torch.Generator().manual_seed(seed)
    clean, ablated, control = [], [], []
    for tr, g in zip(traces, graphs):
        patches, rand = [], []
        for (u, v, t), (m, h, pos, side, vec, basis) in g.signals.items():
            if (merged_node(g.prompt, u), merged_node(g.prompt, v), t) in circuit.edges:
                patches.append((m, h, pos, side, signal_delta(tr, m, h, pos, side, vec, basis)))
                q, _ = torch.linalg.qr(torch.randn(basis.shape, generator=g0).to(basis))
                rand.append((m, h, pos, side, signal_delta(tr, m, h, pos, side, vec, q)))
        clean.append(g.logit_diff)
        a, r = patched_logit_diffs(tr, g.prompt, [patches, rand])
        ablated.append(a)
        control.append(r)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    c, a, r = mean(clean), mean(ablated), mean(control)
    return {
        "clean": c,
        "ablated": a,
        "control": r,
        "removed": (c - a) / c if c else 0.0,
        "removed_control": (c - r) / c if c else 0.0,
    }


def node_name(node: tuple) -> str:
    kind = node[0]
    if kind == "AH":
        return f"L{node[1]}.H{node[2]} {node[3]}→{node[4]}"
    if kind == "MLP":
        return f"MLP{node[1]} {node[2]}"
    if kind == "LD":
        return "logit diff"
    return f"{kind} {node[1]}"


def cytoscape(circuit: Circuit, n_layers: int) -> dict:
    """The circuit in Cytoscape's JSON (elements: nodes with positions, edges with weight and type):
    layers bottom to top, ellipse = MLP, diamond = bias, hexagon = embedding, round-rectangle = head."""
    shapes = {"AH": "round-rectangle", "MLP": "ellipse", "BIAS": "diamond", "EMB": "hexagon", "LD": "star"}

    def level(n: tuple) -> int:  # heads of layer l below its MLP; embedding and biases at the bottom
        if n[0] == "LD":
            return 2 * n_layers + 2
        return 2 * n[1] + (1 if n[0] == "AH" else 2) if n[0] in ("AH", "MLP") else 0

    nodes = sorted(circuit.nodes(), key=lambda n: (level(n), str(n)))
    rows = {lv: r for r, lv in enumerate(sorted({level(n) for n in nodes}))}
    members: dict[int, list] = defaultdict(list)
    for n in nodes:
        members[rows[level(n)]].append(n)
    out_nodes = []
    for row, ns in members.items():
        for i, n in enumerate(ns):
            out_nodes.append(
                {
                    "data": {
                        "id": node_name(n),
                        "label": node_name(n),
                        "kind": n[0],
                        "shape": shapes[n[0]],
                        "layer": n[1] if n[0] in ("AH", "MLP") else None,
                    },
                    "position": {"x": 150 * (i - (len(ns) - 1) / 2), "y": -50 * row},
                }
            )
    edges = [
        {
            "data": {
                "id": f"{node_name(u)} -{t}-> {node_name(v)}",
                "source": node_name(u),
                "target": node_name(v),
                "weight": w,
                "type": t,
                "effect": circuit.effect.get((u, v, t)),
                "prompts": len(circuit.appeared.get((u, v, t), [])),
            }
        }
        for (u, v, t), w in circuit.edges.items()
    ]
    return {"format_version": "1.0", "generated_by": "clt", "elements": {"nodes": out_nodes, "edges": edges}}


def check_model(model: Any) -> None:
    if not hasattr(sys.modules.get("transformers"), "AttentionInterface"):
        raise CircuitError("this transformers version has no AttentionInterface")
