"""attribute(): the attribution graph of a prompt (docs/DESIGN.md §6).

One frozen forward pass with the prompt replicated `batch_size` times; each batch element then
carries the gradient of one target (a feature's pre-activation or a demeaned logit). Backward
hooks on every layer's MLP output and on the token embeddings collect the gradients; edge rows:

    feature (s, p, f), value a:   A[t] += a · (W_dec[s][f, l − s] / s_out[l]) · ∂t/∂mlp_out_l[p], l ≥ s
    error (l, p), vector e:        A[t] += e · ∂t/∂mlp_out_l[p]
    token p, embedding E_p:        A[t] += E_p · ∂t/∂E_p

The feature contractions are one batched GEMM per source layer s, batched over positions
([T, B, (L − s)·d] @ [T, (L − s)·d, K], K = active features per position), so each decoder row is
read once per batch of targets. The targets' gradients enter through taps on the CLT inputs and
the final hidden state (`_Tap`), so the frozen run keeps none of its L × [B, T, d] inputs.
Memory: the gradients [T, B, L, d] (bounded by `batch_size`) and the gathered decoder rows (whole
layers cached up to `decoder_cache_bytes`, the others rebuilt per batch in blocks of positions of
at most DECODER_BLOCK bytes).
Logit rows come first; feature rows are then visited in order of their current influence on the
logits (recomputed every `update_interval · batch_size` rows) up to `max_feature_nodes`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..model import CrossLayerTranscoder
from ..subject import Subject
from .graph import Graph
from .replacement import AttributionError, PromptContext, ReplacementModel

DECODER_BLOCK = 1 << 26  # bytes: the largest uncached decoder block built at once (64 MiB)


def replacement_model(model, clt: CrossLayerTranscoder, tokenizer=None) -> ReplacementModel:
    """A ReplacementModel from a ReplacementModel, a Subject or a transformers causal LM."""
    if isinstance(model, ReplacementModel):
        return model
    if not isinstance(model, Subject):
        model = Subject(model, tokenizer, "auto", clt.arch.input_hook, clt.arch.output_hook)
    return ReplacementModel(model, clt)


def logit_targets(
    ctx: PromptContext, max_n_logits: int, desired_logit_prob: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely next tokens, until their probability reaches `desired_logit_prob` (at most
    `max_n_logits`). -> (vocab ids [K], probabilities [K])."""
    probs = torch.softmax(ctx.logits[ctx.target].float(), -1)
    top_p, top_i = probs.topk(min(max_n_logits, probs.numel()))
    cutoff = (
        int(torch.searchsorted(top_p.cumsum(0), torch.tensor(desired_logit_prob, device=top_p.device))) + 1
    )
    k = min(cutoff, len(top_p))
    return top_i[:k], top_p[:k]


class _Tap(torch.autograd.Function):
    """A backward entry point into a layer's CLT input that keeps nothing of it: the forward returns
    an empty scalar, the backward hands x the gradient `slot` describes (targets (b, p) reading
    vectors v: ∂/∂x[b, p] = v), built only then. The rows' objective sums the taps of the target
    layers, so the frozen run need not hold L × [B, T, d] inputs to index into."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slot: dict) -> torch.Tensor:  # type: ignore[override]
        ctx.slot, ctx.shape, ctx.dtype = slot, x.shape, x.dtype
        return x.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        b, p, v = ctx.slot["targets"]
        dx = torch.zeros(ctx.shape, dtype=ctx.dtype, device=v.device)
        dx.index_put_((b, p), (g * v).to(ctx.dtype), accumulate=True)
        return dx, None


class _Rows:
    """Computes edge rows in batches of targets on one retained frozen forward graph."""

    def __init__(
        self,
        rm: ReplacementModel,
        ctx: PromptContext,
        feats: torch.Tensor,
        values: torch.Tensor,
        batch_size: int,
        cache_bytes: int,
    ):
        self.rm, self.ctx, self.B = rm, ctx, batch_size
        L, T = rm.n_layers, len(ctx.ids)
        self.L, self.T = L, T
        self.feats, self.values = feats, values  # [n, 3] (layer, pos, feat) sorted; [n]
        self.n_active = len(feats)
        self.n_cols = self.n_active + L * T + T
        self.err_col0, self.tok_col0 = self.n_active, self.n_active + L * T
        # the features of source layer s are the range [bounds[s], bounds[s + 1]) of the sorted list
        self.bounds = torch.searchsorted(
            feats[:, 0].contiguous(), torch.arange(L + 1, device=feats.device)
        ).tolist()
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.slots: dict[int, tuple[torch.Tensor, int]] = {}
        self.cache_left = cache_bytes
        self.cache_budget = cache_bytes
        self.decoder_peak = 0  # the largest decoder block built (cached or transient), bytes
        self.buf: torch.Tensor | None = None
        self.grads: torch.Tensor | None = None  # [T, B, L, d]: ∂targets/∂(MLP output of each layer)
        self._build()

    def _slots(self, s: int) -> tuple[torch.Tensor, int]:
        """Source layer s's active features padded per position: (local [T, K] index into the
        layer's features, K = the most at one position; padding = K's count `hi − lo`). Small."""
        if s not in self.slots:
            lo, hi = self.bounds[s], self.bounds[s + 1]
            pos = self.feats[lo:hi, 1]  # ascending within a source layer
            counts = torch.bincount(pos, minlength=self.T)
            K = int(counts.max())
            slot = torch.arange(hi - lo, device=pos.device) - (counts.cumsum(0) - counts)[pos]
            local = torch.full((self.T, K), hi - lo, dtype=torch.long, device=pos.device)
            local[pos, slot] = torch.arange(hi - lo, device=pos.device)
            self.slots[s] = (local, K)
        return self.slots[s]

    def _decoder(self, s: int, p0: int, p1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder rows of source layer s's active features at positions p0..p1−1, value- and
        scale-weighted, padded per position: (D [p1 − p0, K, (L − s)·d], cols [p1 − p0, K] (−1 =
        padding))."""
        clt, lo, hi = self.rm.clt, self.bounds[s], self.bounds[s + 1]
        local, K = self._slots(s)
        local = local[p0:p1]
        used = local[local < hi - lo]
        a, b = (int(used.min()), int(used.max()) + 1) if len(used) else (0, 0)  # contiguous: sorted
        f = self.feats[lo + a : lo + b]
        w = clt.W_dec[s][f[:, 2]].float()  # [n, L − s, d]
        w = w * self.values[lo + a : lo + b, None, None] / clt.output_scale[s:].float()[None, :, None]
        idx = torch.where(local < hi - lo, local - a, b - a)
        D = torch.cat([w.flatten(1), w.new_zeros(1, w.shape[1] * w.shape[2])])[idx]  # padding: zero row
        cols = torch.where(local < hi - lo, local + lo, -1)
        self.decoder_peak = max(self.decoder_peak, D.numel() * D.element_size())
        return D, cols

    def _blocks(self, s: int):
        """(p0, p1, D, cols) covering all positions: one cached block when the whole layer fits
        the cache budget, else blocks of positions of at most DECODER_BLOCK bytes, rebuilt."""
        if s in self.cache:
            yield (0, self.T, *self.cache[s])
            return
        _, K = self._slots(s)
        size = self.T * K * (self.L - s) * self.rm.d_model * 4
        if size <= self.cache_left:
            self.cache[s] = self._decoder(s, 0, self.T)
            self.cache_left -= size
            yield (0, self.T, *self.cache[s])
            return
        step = max(1, DECODER_BLOCK // max(K * (self.L - s) * self.rm.d_model * 4, 1))
        for p0 in range(0, self.T, step):
            p1 = min(p0 + step, self.T)
            yield (p0, p1, *self._decoder(s, p0, p1))

    def _layer_grad(self, l: int, g: torch.Tensor) -> None:
        """g: [B, T, d] = ∂targets/∂(MLP output of layer l): error edges now, features after the pass."""
        assert self.buf is not None and self.grads is not None
        g = g.float()
        c0 = self.err_col0 + l * self.T
        self.buf[:, c0 : c0 + self.T] += (g * self.ctx.err[:, l]).sum(-1)
        self.grads[:, :, l] = g.transpose(0, 1)

    def _feature_edges(self) -> None:
        """Per source layer and block of positions: [n, B, (L − s)·d] @ [n, (L − s)·d, K] -> [n, B, K]."""
        assert self.buf is not None and self.grads is not None
        T, B, L, d = self.grads.shape
        for s in range(L):
            if self.bounds[s + 1] == self.bounds[s]:
                continue
            for p0, p1, D, cols in self._blocks(s):
                G = self.grads[p0:p1, :, s:].reshape(p1 - p0, B, (L - s) * d)
                Y = torch.bmm(G, D.transpose(1, 2))  # [n, B, K]
                valid = cols.flatten() >= 0
                self.buf.index_add_(1, cols.flatten()[valid], Y.permute(1, 0, 2).reshape(B, -1)[:, valid])

    def _token_grad(self, g: torch.Tensor) -> None:
        assert self.buf is not None
        self.buf[:, self.tok_col0 :] += (g.float() * self.ctx.E).sum(-1)

    def _build(self) -> None:
        """The frozen forward pass at batch B, with gradient hooks."""
        rm, ctx, B = self.rm, self.ctx, self.B
        dtype = rm.subject.dtype
        self.one_E = torch.ones((), device=rm.device, dtype=dtype, requires_grad=True)
        self.ones = [torch.ones((), device=rm.device, dtype=dtype, requires_grad=True) for _ in range(self.L)]
        E = ctx.E.to(dtype).expand(B, -1, -1) * self.one_E
        self.handles = [E.register_hook(self._token_grad)]

        def on_output(layer, out):
            out = out * self.ones[layer]
            self.handles.append(out.register_hook(lambda g, layer=layer: self._layer_grad(layer, g)))
            return out

        # count what autograd keeps for the backward passes (weights excluded): graph.info's memory
        weights = {
            p.untyped_storage().data_ptr() for p in (*rm.subject.model.parameters(), *rm.clt.parameters())
        }
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in weights:
                saved[st.data_ptr()] = st.nbytes()
            return t

        self.tap_slots: list[dict] = [{} for _ in range(self.L + 1)]  # layers, then the final hidden

        def on_input(layer, x):
            return _Tap.apply(x, self.tap_slots[layer])

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.taps, hidden = rm.frozen_run(ctx, E, rm.mlp_outputs(ctx)[None], on_output, on_input)
            self.taps.append(on_input(self.L, hidden))
        self.forward_bytes = sum(saved.values())

    @property
    def cache_bytes_used(self) -> int:
        return self.cache_budget - self.cache_left

    def release(self) -> None:
        """Drop the forward graph and the caches now (the hooks make a reference cycle)."""
        for h in self.handles:
            h.remove()
        self.handles, self.cache, self.slots = [], {}, {}
        self.taps = self.one_E = self.ones = None  # type: ignore[assignment]

    def compute(self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """Rows for up to B targets: target i reads `vectors[i]` · (layer layers[i]'s CLT input at
        positions[i]); layer == L means the final hidden state (logits). -> [n, n_cols] fp32."""
        n = len(layers)
        assert n <= self.B
        self.buf = torch.zeros(self.B, self.n_cols, device=vectors.device)
        self.grads = torch.zeros(self.T, self.B, self.L, self.rm.d_model, device=vectors.device)
        with torch.enable_grad():
            obj = torch.zeros((), device=vectors.device)
            b = torch.arange(n, device=layers.device)
            for layer in layers.unique().tolist():
                m = layers == layer
                self.tap_slots[layer]["targets"] = (b[m], positions[m], vectors[m].float())
                obj = obj + self.taps[layer]
            torch.autograd.grad(obj, [self.one_E, *self.ones], retain_graph=True, allow_unused=True)
        with torch.no_grad():
            self._feature_edges()
        out, self.buf, self.grads = self.buf[:n], None, None
        return out


def context_bytes(ctx: PromptContext) -> int:
    """Bytes held by one prompt's clean run: its [T, ·] tensors and the recorded attention inputs."""
    ts = [v for v in vars(ctx).values() if isinstance(v, torch.Tensor)]
    for rec in ctx.freeze.attn.values():
        ts += [t for t in (rec.query, rec.key, rec.value, rec.mask) if t is not None]
    ts += [*ctx.freeze.scales.values(), *ctx.freeze.gates.values()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}.values())


@torch.no_grad()
def node_bias(rm: ReplacementModel, ctx: PromptContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen model with every source at zero: the constant part of every target.
    -> (h: [T, L, F], demeaned pre-softcap logits at the target position: [V])."""
    h, logits = rm.frozen_forward(
        ctx, torch.zeros_like(ctx.E), torch.zeros_like(ctx.a), torch.zeros_like(ctx.err)
    )
    last = logits[ctx.target]
    return h, last - last.mean()


def partial_influence(
    rows: torch.Tensor, row_weights: torch.Tensor, row_cols: torch.Tensor, max_iter: int = 1000
) -> torch.Tensor:
    """Influence on the logits of every column, from the rows computed so far.

    rows: [r, n_cols]; row_weights: [r] (logit probabilities on logit rows); row_cols: [r] the
    column of each row's node (−1 for logits). Iterates on the small square block (visited nodes)
    and applies the full rows once: w·Â + w·Â² + … restricted to the known rows."""
    chunk = 256
    denom = torch.cat([rows[i : i + chunk].abs().sum(1) for i in range(0, len(rows), chunk)])
    denom = denom.clamp_min(1e-10)  # Σ_s |A[t, s]| per row; |rows| is never materialised whole
    feat_rows = (row_cols >= 0).nonzero().flatten()
    S = rows[:, row_cols[feat_rows]].abs() / denom[:, None]  # [r, r_f]
    prod, total = row_weights.clone(), row_weights.clone()
    for _ in range(max_iter):
        nxt = torch.zeros_like(prod)
        nxt[feat_rows] = prod @ S
        if not nxt.any():
            break
        total += nxt
        prod = nxt
    coef = total / denom
    out = rows.new_zeros(rows.shape[1])
    for i in range(0, len(rows), chunk):
        out += coef[i : i + chunk] @ rows[i : i + chunk].abs()
    return out


def attribute(
    prompt,
    clt: CrossLayerTranscoder,
    model,
    *,
    tokenizer=None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    update_interval: int = 4,
    decoder_cache_bytes: int = 2 << 30,
    verbose: bool = True,
    scan: str = "",
    progress=None,
    attention: bool = False,
) -> Graph:
    """The attribution graph of `prompt` through `clt` spliced into `model` (a ReplacementModel,
    a Subject or a transformers causal LM; pass `tokenizer` with a bare model).

    Nodes: active features (position 0 excluded), error nodes per (layer, position), token nodes,
    and the top logits (at most `max_n_logits`, until `desired_logit_prob` of the probability).
    Edges: direct effects in the frozen replacement model (see `clt.attribution.graph`). At most
    `max_feature_nodes` feature rows are computed (None: all), most influential first; the columns
    of features never visited are dropped. Memory grows with `batch_size`. `progress(done, total)`,
    when given, is called after every batch of rows (the viewer's progress indicator).
    attention=True also splits the cross-position edges of the pruned graph (default thresholds)
    into per-head loadings and attributes the scores of the heads carrying them
    (`graph.attention`, see `clt.attribution.qk`)."""
    if max_n_logits < 1:
        raise AttributionError(f"max_n_logits must be ≥ 1, got {max_n_logits}")
    if not 0 < desired_logit_prob <= 1:
        raise AttributionError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob}")
    if batch_size < 1 or update_interval < 1:
        raise AttributionError("batch_size and update_interval must be ≥ 1")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise AttributionError(f"max_feature_nodes must be ≥ 0, got {max_feature_nodes}")
    rm = replacement_model(model, clt, tokenizer)
    ctx = rm.prepare(prompt)
    L, T, dev = rm.n_layers, len(ctx.ids), ctx.a.device

    nz = ctx.a.transpose(0, 1).nonzero()  # (layer, pos, feat), sorted
    feats, values = nz, ctx.a[nz[:, 1], nz[:, 0], nz[:, 2]].float()
    n_active = len(feats)
    n_visit = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    vocab, probs = logit_targets(ctx, max_n_logits, desired_logit_prob)
    K = len(vocab)

    rows = _Rows(rm, ctx, feats, values, batch_size, decoder_cache_bytes)
    edge = torch.zeros(K + n_visit, rows.n_cols, device=dev)
    row_cols = torch.full((K + n_visit,), -1, dtype=torch.long, device=dev)
    bar = tqdm(total=K + n_visit, unit="row", desc="attribution", disable=not verbose)

    done = [0]

    def advance(n: int) -> None:
        bar.update(n)
        done[0] += n
        if progress is not None:
            progress(done[0], K + n_visit)

    lv = rm.logit_vectors(vocab)
    for i in range(0, K, batch_size):
        j = min(i + batch_size, K)
        n = j - i
        edge[i:j] = rows.compute(
            torch.full((n,), L, device=dev), torch.full((n,), ctx.target % T, device=dev), lv[i:j]
        )
        advance(n)

    def visit(idx: torch.Tensor, at: int) -> int:
        for i in range(0, len(idx), batch_size):
            chunk = idx[i : i + batch_size]
            f = feats[chunk]
            edge[at : at + len(chunk)] = rows.compute(f[:, 0], f[:, 1], feature_vectors(rm, f))
            row_cols[at : at + len(chunk)] = chunk
            at += len(chunk)
            advance(len(chunk))
        return at

    at = K
    visited = torch.zeros(n_active, dtype=torch.bool, device=dev)
    weights = torch.zeros(K + n_visit, device=dev)
    weights[:K] = probs.float()
    while at < K + n_visit:
        if n_visit == n_active:
            order = torch.arange(n_active, device=dev)
        else:
            infl = partial_influence(edge[:at], weights[:at], row_cols[:at])[:n_active]
            infl[visited] = -1
            order = infl.argsort(descending=True)[: min(update_interval * batch_size, K + n_visit - at)]
        visited[order] = True
        at = visit(order, at)
    bar.close()
    rows.release()

    # package: features sorted by (layer, pos, feat), then errors, tokens, logits
    selected = visited.nonzero().flatten()
    row_of = torch.empty(n_active, dtype=torch.long, device=dev)
    row_of[row_cols[K:]] = torch.arange(K, K + n_visit, device=dev)
    n_sel = len(selected)
    N = n_sel + L * T + T + K
    cols = torch.cat([selected, torch.arange(n_active, rows.n_cols, device=dev)])
    # the stored rows (graph.edge_rows): features, then logits; gathered in chunks of rows, so the
    # only full-size buffer is `edge` ([rows computed, n_cols], linear in the prompt)
    R = n_sel + K
    edge_rows = torch.zeros(R, N)
    unvisited = torch.zeros(N)
    rest = (~visited).nonzero().flatten()
    src_rows = torch.cat([row_of[selected], torch.arange(K, device=dev)])
    for i in range(0, R, 256):
        chunk = edge[src_rows[i : i + 256]]
        edge_rows[i : i + len(chunk), : n_sel + L * T + T] = chunk[:, cols].cpu()
        if len(rest):
            nodes = torch.cat([torch.arange(n_sel), torch.arange(N - K, N)])[i : i + len(chunk)]
            unvisited[nodes] = chunk[:, rest].sum(1).cpu()
        del chunk
    edge = edge.new_empty(0)  # frees the buffer (`visit` closes over the name)

    MiB = 2**20
    memory = {  # where the memory went, MiB (graph.info["memory_mib"]; benchmarks/attribution.py prints it)
        "clean run (activations, errors, logits, recorded q/k/v/mask)": context_bytes(ctx) / MiB,
        f"forward graph kept for the backward passes (batch {batch_size})": rows.forward_bytes / MiB,
        "gradients [T, batch, L, d]": T * batch_size * L * rm.d_model * 4 / MiB,
        "row buffer [rows computed, n_active + L·T + T]": (K + n_visit) * rows.n_cols * 4 / MiB,
        "decoder blocks (cache + largest transient)": (rows.cache_bytes_used + rows.decoder_peak) / MiB,
        "graph rows [kept + logits, N]": edge_rows.numel() * 4 / MiB,
    }

    h0, logit0 = node_bias(rm, ctx)
    values_t, bias_t = torch.zeros(N), torch.zeros(N)
    fs = feats[selected]
    values_t[:n_sel] = ctx.h[fs[:, 1], fs[:, 0], fs[:, 2]].float().cpu()
    bias_t[:n_sel] = h0[fs[:, 1], fs[:, 0], fs[:, 2]].cpu()
    last = ctx.logits_pre[ctx.target]
    values_t[N - K :] = (last[vocab] - last.mean()).cpu()
    bias_t[N - K :] = logit0[vocab].cpu()

    tok = rm.subject.tokenizer
    decode = (lambda i: tok.decode([int(i)])) if tok is not None else (lambda i: str(int(i)))
    graph = Graph(
        prompt=prompt if isinstance(prompt, str) else "",
        input_tokens=ctx.ids.cpu(),
        token_strings=[decode(i) for i in ctx.ids],
        active_features=feats.cpu(),
        activation_values=values.cpu(),
        selected_features=selected.cpu(),
        edge_rows=edge_rows,
        logit_tokens=vocab.cpu(),
        logit_token_strings=[decode(i) for i in vocab],
        logit_probabilities=probs.float().cpu(),
        n_layers=L,
        vocab_size=int(ctx.logits.shape[-1]),
        node_values=values_t,
        node_bias=bias_t,
        node_unvisited=unvisited,
        scan=scan,
        model_name=rm.subject.name,
        info={
            "n_active_features": n_active,
            "max_feature_nodes": max_feature_nodes,
            "batch_size": batch_size,
            "activation": rm.clt.arch.activation,
            "d_sae": rm.clt.d_sae,
            "visited_fraction": n_visit / max(n_active, 1),
            "target_position": ctx.target % T,
            "memory_mib": memory,
        },
    )
    if attention:
        from .graph import prune
        from .qk import attention_summary

        graph.attention = attention_summary(rm, graph, ctx, prune(graph))
    return graph


def dense_rows(
    rm: ReplacementModel,
    ctx: PromptContext,
    feats: torch.Tensor,
    values: torch.Tensor,
    layers: torch.Tensor,
    positions: torch.Tensor,
    vectors: torch.Tensor,
) -> torch.Tensor:
    """Reference rows: one backward pass per target at batch 1, gradients taken on leaf copies of
    the sources, every decoder contracted densely (all F features, then the active ones picked).
    The baseline of `benchmarks/attribution.py` and the oracle of the tests. Same layout as
    `_Rows.compute`."""
    L, T, F = rm.n_layers, len(ctx.ids), rm.d_sae
    clt = rm.clt
    with torch.enable_grad():
        E = ctx.E[None].clone().requires_grad_(True)
        M = rm.mlp_outputs(ctx)[None].clone().requires_grad_(True)  # [1, T, L, d]
        xs, hidden = rm.frozen_run(ctx, E, M)
        out = []
        for layer, pos, vec in zip(layers.tolist(), positions.tolist(), vectors):
            src = hidden if layer == L else xs[layer]
            gE, gM = torch.autograd.grad(
                (src[0, pos].float() * vec).sum(), [E, M], retain_graph=True, materialize_grads=True
            )
            gE, gM = gE[0].float(), gM[0].float()  # [T, d], [T, L, d]
            row = torch.zeros(len(feats) + L * T + T, device=vectors.device)
            contrib = torch.zeros(L, T, F, device=vectors.device)
            for s in range(L):
                g = gM[:, s:] / clt.output_scale[s:, None].float()  # [T, L − s, d]
                contrib[s] = torch.einsum("fld,tld->tf", clt.W_dec[s].float(), g)
            row[: len(feats)] = contrib[feats[:, 0], feats[:, 1], feats[:, 2]] * values
            row[len(feats) : len(feats) + L * T] = (gM * ctx.err).sum(-1).T.flatten()
            row[len(feats) + L * T :] = (gE * ctx.E).sum(-1)
            out.append(row)
    return torch.stack(out) if out else torch.zeros(0, len(feats) + L * T + T)


def feature_vectors(rm: ReplacementModel, feats: torch.Tensor) -> torch.Tensor:
    """∂h/∂x for features (layer, pos, feat): [n, 3] -> [n, d]."""
    clt = rm.clt
    return clt.W_enc[feats[:, 0], feats[:, 2]].float() * clt.input_scale[feats[:, 0]].float()[:, None]
