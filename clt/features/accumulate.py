"""One streaming pass over activations: per-feature statistics, top-k contexts, interval samples
(docs/DESIGN.md §8). Everything here is exact and mergeable: the result does not depend on the batch
size, on the order of the batches, or on how the tokens were split over array tasks.

Token positions are global: token g of the pass is token g mod P of window g // P (P tokens per
window, BOS dropped). Per feature (layer l, index f), over the N tokens counted:

    count      #{g : a_g > 0}                     activation_frequency = count / N
    total      Σ a_g  (float64)                   mean activation = total / count
    max, min   of the non-zero a_g
    hist       log-spaced bins of the non-zero a_g: bin 0 < 10^LO ≤ bins 1…B−2 (BINS_PER_DECADE per
               decade) < 10^HI ≤ bin B−1
    top        the k largest per-document maxima: for every document, its best token
               (value desc, then position asc), and the k best documents by the same order
    samples    per log stratum (STRATA_PER_DECADE per decade, plus under/overflow), the s tokens
               with the smallest pseudo-random priority hash(l, f, g): a uniform sample of the
               stratum's tokens that merges exactly (bottom-s of a fixed hash)

Top and sample entries carry their context: C tokens of the same window and document around the
token (left tokens first, -1 where the window or the document ends) and the feature's activation
on each of them, gathered when the entry is offered (the whole window is in the batch then).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LO, HI = -3, 3  # histogram range: [1e-3, 1e3) in the CLT's activation units
BINS_PER_DECADE = 32  # ≈ 7.5 % relative bin width
N_BINS = (HI - LO) * BINS_PER_DECADE + 2
STRATA_PER_DECADE = 2  # interval-sample strata (under/overflow strata at the ends)
N_STRATA = (HI - LO) * STRATA_PER_DECADE + 2
EMPTY = float("inf")  # the order key of an empty slot


def log_bin(v: torch.Tensor, per_decade: int) -> torch.Tensor:
    """v > 0 -> bin index: the number of edges 10^(LO + i/per_decade) ≤ v (0 below 10^LO, the
    last at ≥ 10^HI), against the edges rounded to v's dtype."""
    key = (per_decade, v.dtype, v.device)
    if key not in _EDGES:
        _EDGES[key] = bin_edges(per_decade).to(v.device, v.dtype)
    return torch.bucketize(v, _EDGES[key], right=True)


_EDGES: dict = {}


def bin_edges(per_decade: int = BINS_PER_DECADE) -> torch.Tensor:
    """The inner edges 10^LO … 10^HI of `log_bin` ([n + 1], float64)."""
    n = (HI - LO) * per_decade
    return torch.tensor([10.0 ** (LO + i / per_decade) for i in range(n + 1)], dtype=torch.float64)


def priority(layer: torch.Tensor, feature: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random priority in [0, 2^52) for (layer, feature, token), as float64 (exact):
    splitmix64's finaliser over a unique id, on int64 with wrap-around."""
    x = (g * 1_000_003 + feature) * 131 + layer
    x = x * -7046029254386353131 + 1442695040888963407
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return (x & ((1 << 52) - 1)).double()


def lexsort(*keys: torch.Tensor) -> torch.Tensor:
    """The permutation sorting by keys[0], then keys[1], … (all ascending)."""
    perm = torch.arange(keys[0].numel(), device=keys[0].device)
    for key in reversed(keys):
        perm = perm[torch.argsort(key[perm], stable=True)]
    return perm


def run_starts(*keys: torch.Tensor) -> torch.Tensor:
    """For keys sorted so that equal tuples are adjacent: True where a new tuple starts."""
    new = torch.zeros(keys[0].numel(), dtype=torch.bool, device=keys[0].device)
    if keys[0].numel():
        new[0] = True
        for k in keys:
            new[1:] |= k[1:] != k[:-1]
    return new


@dataclass
class Entries:
    """A flat list of candidate entries (M of them) for the groups of a `SlotBuffer`. Their
    contexts are produced on demand (`context(i)` for the indices i that get a slot), so that
    candidates that do not make it cost no gather."""

    group: torch.Tensor  # [M] int64
    order: torch.Tensor  # [M] float64, smaller = better
    idx: torch.Tensor  # [M] int64 global token index (tie-break: smaller first)
    val: torch.Tensor  # [M] float32 activation at the token
    doc: torch.Tensor  # [M] int64 document
    context: Callable[
        [torch.Tensor], tuple[torch.Tensor, torch.Tensor]
    ]  # i -> tok [m, C] int32, act [m, C] f16


class SlotBuffer:
    """`cap` best entries per group, by (order, idx) ascending; with `dedup`, at most one entry per
    (group, document) (its best). Slots of a group are kept sorted, empty ones last."""

    FIELDS = ("order", "idx", "val", "doc", "tok", "act")
    KEYS = ("order", "idx", "val", "doc")

    def __init__(self, n_groups: int, cap: int, context: int, dedup: bool, device="cpu"):
        self.cap, self.dedup = cap, dedup
        self.order = torch.full((n_groups, cap), EMPTY, dtype=torch.float64, device=device)
        self.idx = torch.full((n_groups, cap), -1, dtype=torch.int64, device=device)
        self.val = torch.zeros(n_groups, cap, dtype=torch.float32, device=device)
        self.doc = torch.full((n_groups, cap), -1, dtype=torch.int64, device=device)
        self.tok = torch.full((n_groups, cap, context), -1, dtype=torch.int32, device=device)
        self.act = torch.zeros(n_groups, cap, context, dtype=torch.float16, device=device)

    def worst(self, group: torch.Tensor) -> torch.Tensor:
        """Order key an entry of `group` must not exceed to have a chance (EMPTY while not full)."""
        return self.order[group, -1]

    def entries(self) -> Entries:
        """Every filled slot as an entry (to merge into another buffer)."""
        filled = self.idx >= 0
        rows = torch.arange(self.order.shape[0], device=self.order.device)[:, None].expand(-1, self.cap)[
            filled
        ]
        tok, act = self.tok[filled], self.act[filled]
        return Entries(
            rows,
            self.order[filled],
            self.idx[filled],
            self.val[filled],
            self.doc[filled],
            lambda i: (tok[i], act[i]),
        )

    def offer(self, e: Entries) -> None:
        """Merge candidate entries into the buffer. Sorting sees only the scalar keys; the contexts
        of the entries that keep or get a slot are gathered once at the end."""
        if e.group.numel() == 0:
            return
        dev = e.group.device
        groups = torch.unique(e.group)
        filled = self.idx[groups] >= 0  # [G, cap]
        og = groups[:, None].expand(-1, self.cap)[filled]
        slot_of_old = (groups[:, None] * self.cap + torch.arange(self.cap, device=dev))[filled]
        M = len(e.group)
        group = torch.cat([og, e.group])
        order = torch.cat([self.order[groups][filled], e.order])
        idx = torch.cat([self.idx[groups][filled], e.idx])
        doc = torch.cat([self.doc[groups][filled], e.doc])
        val = torch.cat([self.val[groups][filled], e.val])
        src = torch.cat([slot_of_old, -1 - torch.arange(M, device=dev)])  # ≥ 0: an old slot; < 0: candidate
        keep = torch.arange(len(group), device=dev)
        if self.dedup:  # one entry per (group, document): its best
            perm = lexsort(group, doc, order, idx)
            keep = perm[run_starts(group[perm], doc[perm])]
        perm = keep[lexsort(group[keep], order[keep], idx[keep])]
        start = run_starts(group[perm])
        pos = torch.arange(len(perm), device=dev)
        rank = pos - torch.cummax(torch.where(start, pos, 0), 0).values
        perm, rank = perm[rank < self.cap], rank[rank < self.cap]
        g, sr = group[perm], src[perm]
        C = self.tok.shape[-1]
        tok = torch.empty(len(perm), C, dtype=self.tok.dtype, device=dev)
        act = torch.empty(len(perm), C, dtype=self.act.dtype, device=dev)
        old = sr >= 0
        tok[old], act[old] = self.tok.view(-1, C)[sr[old]], self.act.view(-1, C)[sr[old]]
        if (~old).any():
            tok[~old], act[~old] = e.context(-1 - sr[~old])
        for f, fill in (("order", EMPTY), ("idx", -1), ("val", 0), ("doc", -1), ("tok", -1), ("act", 0)):
            getattr(self, f)[groups] = fill
        self.order[g, rank], self.idx[g, rank] = order[perm], idx[perm]
        self.val[g, rank], self.doc[g, rank] = val[perm], doc[perm]
        self.tok[g, rank], self.act[g, rank] = tok, act

    def state(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    def load(self, state: dict) -> None:
        for f in self.FIELDS:
            getattr(self, f).copy_(state[f])


class _Context:
    """The contexts of one batch: for entries at tokens g (rows `row` of the accumulator), the C
    tokens around each (same window and document) and the feature's activation on them."""

    def __init__(self, acts, row0, tokens, docs, counted, g0, per, left, right):
        self.acts, self.row0, self.tokens, self.docs, self.counted = acts, row0, tokens, docs, counted
        self.g0, self.per = g0, per
        self.bounds = torch.tensor([a.shape[1] for a in acts]).cumsum(0).tolist()
        self.offs = torch.arange(-left, right + 1, device=tokens.device)

    def offer(self, buf: SlotBuffer, group, row, order, g, val) -> None:
        if group.numel() == 0:
            return
        p = g - self.g0  # [M] position in the batch
        col = row - self.row0  # column among the layers' activations

        def context(i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q = p[i, None] + self.offs  # [m, C]
            w0 = (p[i] // self.per * self.per)[:, None]
            qc = q.clamp(0, len(self.tokens) - 1)
            ok = (q >= w0) & (q < w0 + self.per) & (self.docs[qc] == self.docs[p[i]][:, None])
            if self.counted is not None:
                ok &= self.counted[qc]
            act = torch.zeros(q.shape, dtype=torch.float16, device=q.device)
            c, start = col[i], 0
            for a, end in zip(self.acts, self.bounds):  # the layer each entry's column is in
                here = (c >= start) & (c < end)
                if here.any():
                    act[here] = a[qc[here], (c[here] - start)[:, None]].to(torch.float16)
                start = end
            return torch.where(ok, self.tokens[qc].to(torch.int32), -1), torch.where(ok, act, 0)

        buf.offer(Entries(group, order, g, val, self.docs[p], context))


class CardAccumulator:
    """Streaming statistics of the features `features[l]` (indices into layer l; None = all F) of
    every layer. `update(l, a, tokens, docs, g0, per)` takes one batch of whole windows."""

    def __init__(
        self,
        n_layers: int,
        d_sae: int,
        top_k: int = 20,
        samples: int = 2,
        left: int = 24,
        right: int = 8,
        features: list[torch.Tensor | None] | None = None,
        device="cpu",
    ):
        self.L, self.F, self.top_k, self.samples = n_layers, d_sae, top_k, samples
        self.left, self.right = left, right
        self.features = features or [None] * n_layers
        self.widths = [d_sae if f is None else len(f) for f in self.features]
        self.offsets = [0, *torch.tensor(self.widths).cumsum(0).tolist()]  # row of (l, j) = offsets[l] + j
        R, C = self.offsets[-1], left + 1 + right
        self.n_tokens = 0
        self.count = torch.zeros(R, dtype=torch.int64, device=device)
        self.total = torch.zeros(R, dtype=torch.float64, device=device)
        self.max = torch.zeros(R, dtype=torch.float32, device=device)
        self.min = torch.full((R,), float("inf"), dtype=torch.float32, device=device)
        self.hist = torch.zeros(R, N_BINS, dtype=torch.int32, device=device)
        self.top = SlotBuffer(R, top_k, C, dedup=True, device=device)
        self.row_layer = torch.repeat_interleave(torch.arange(n_layers), torch.tensor(self.widths)).to(device)
        self.row_feature = torch.cat([self.feature_ids(layer) for layer in range(n_layers)]).to(device)
        self.strata = SlotBuffer(R * N_STRATA, samples, C, dedup=False, device=device)

    # -- one batch ------------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        layer: int,
        a: torch.Tensor | list[torch.Tensor],
        tokens: torch.Tensor,
        docs: torch.Tensor,
        g0: int,
        per: int,
        counted: torch.Tensor | None = None,
    ) -> None:
        """a: [n, F_l] activations of layer `layer`'s selected features on n = W·per tokens (whole
        windows, global positions g0 …), or a list of them for layers `layer`, `layer` + 1, … (one
        call for several layers saves per-call work); tokens, docs: [n]; counted: [n] bool (False =
        excluded position: no statistics, never an example; default all). Call `add_tokens` once
        per batch."""
        acts = a if isinstance(a, list) else [a]
        parts = []
        for i, al in enumerate(acts):  # the non-zeros of every layer: token, accumulator row, value
            t, j = (al > 0).nonzero(as_tuple=True)
            if counted is not None:
                t, j = t[counted[t]], j[counted[t]]
            parts.append((t, self.offsets[layer + i] + j, al[t, j].float()))
        t, row, v = (torch.cat(p) for p in zip(*parts))
        self.count.index_add_(0, row, torch.ones_like(row))
        self.total.index_add_(0, row, v.double())
        self.max.scatter_reduce_(0, row, v, "amax")
        self.min.scatter_reduce_(0, row, v, "amin")
        self.hist.view(-1).index_add_(
            0, row * N_BINS + log_bin(v, BINS_PER_DECADE), torch.ones_like(row, dtype=torch.int32)
        )
        g = g0 + t
        ctx = _Context(acts, self.offsets[layer], tokens, docs, counted, g0, per, self.left, self.right)

        # top-k: the best token of every (feature, document) in the batch, then the buffer merge.
        # A token below its feature's k-th value cannot get in: filter before grouping.
        hope = v.double() >= -self.top.worst(row)
        t_, v_, row_, g_ = t[hope], v[hope], row[hope], g[hope]
        dloc = docs - docs.min() if len(docs) else docs
        key = row_ * (int(dloc.max()) + 1 if len(docs) else 1) + dloc[t_]
        uk, inv = torch.unique(key, return_inverse=True)
        best = torch.zeros(len(uk), dtype=v.dtype, device=v.device).scatter_reduce_(0, inv, v_, "amax")
        at_best = v_ == best[inv]
        first = torch.full((len(uk),), torch.iinfo(torch.int64).max, dtype=torch.int64, device=v.device)
        first.scatter_reduce_(0, inv[at_best], g_[at_best], "amin")
        crow = torch.zeros(len(uk), dtype=torch.int64, device=v.device).scatter_(0, inv, row_)
        order = -best.double()
        keep = order <= self.top.worst(crow)
        # a document already in the buffer with a better entry: nothing to merge (long documents
        # keep offering the same (feature, document) batch after batch)
        cdoc = dloc.new_zeros(len(uk)).scatter_(0, inv, docs[t_])
        same = self.top.doc[crow] == cdoc[:, None]  # [M, k]
        o, ix = self.top.order[crow], self.top.idx[crow]
        better = same & ((o < order[:, None]) | ((o == order[:, None]) & (ix < first[:, None])))
        keep &= ~better.any(1)
        ctx.offer(self.top, crow[keep], crow[keep], order[keep], first[keep], best[keep])

        # interval samples: bottom-s priority per (feature, stratum)
        prio = priority(self.row_layer[row], self.row_feature[row], g)
        srow = row * N_STRATA + log_bin(v, STRATA_PER_DECADE)
        keep = prio <= self.strata.worst(srow)
        ctx.offer(self.strata, srow[keep], row[keep], prio[keep], g[keep], v[keep])

    def add_tokens(self, n: int) -> None:
        self.n_tokens += int(n)

    def feature_ids(self, layer: int) -> torch.Tensor:
        f = self.features[layer]
        return torch.arange(self.F, device=self.count.device) if f is None else f.to(self.count.device)

    # -- merging and saving ---------------------------------------------------------------------
    STATS = ("count", "total", "max", "min", "hist")

    def merge(self, other: CardAccumulator) -> None:
        """Add another accumulator's tokens (a disjoint token range) to this one."""
        self.n_tokens += other.n_tokens
        self.count += other.count
        self.total += other.total
        torch.maximum(self.max, other.max, out=self.max)
        torch.minimum(self.min, other.min, out=self.min)
        self.hist += other.hist
        self.top.offer(other.top.entries())
        self.strata.offer(other.strata.entries())

    def state(self) -> dict:
        return {
            "n_tokens": self.n_tokens,
            **{k: getattr(self, k) for k in self.STATS},
            "top": self.top.state(),
            "strata": self.strata.state(),
        }

    def load(self, state: dict) -> None:
        self.n_tokens = int(state["n_tokens"])
        for k in self.STATS:
            getattr(self, k).copy_(state[k])
        self.top.load(state["top"])
        self.strata.load(state["strata"])

    def memory_bytes(self) -> int:
        ts = [
            *(getattr(self, k) for k in self.STATS),
            *self.top.state().values(),
            *self.strata.state().values(),
        ]
        return sum(t.numel() * t.element_size() for t in ts)


# ---------------------------------------------------------------------------------------------
# From the statistics to what a card shows


def _bin_bounds(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lo, hi: [R] -> the bounds [R, N_BINS] of every log bin, clamped to [lo, hi] (the
    under/overflow bins span [lo, 10^LO) and [10^HI, hi])."""
    edges = bin_edges().to(lo.device)
    R = len(lo)
    lower = torch.cat([lo[:, None], edges.expand(R, -1)], 1)
    upper = torch.cat([edges.expand(R, -1), hi[:, None]], 1)
    return torch.minimum(torch.maximum(lower, lo[:, None]), hi[:, None]), torch.minimum(
        torch.maximum(upper, lo[:, None]), hi[:, None]
    )


def quantiles(hist: torch.Tensor, vmin: torch.Tensor, vmax: torch.Tensor, n: int = 100) -> torch.Tensor:
    """hist: [R, N_BINS] log histograms of the non-zero activations, vmin, vmax: [R] -> the n
    quantiles (1/n … n/n) [R, n], geometric interpolation inside a bin, clamped to [min, max]
    (monotone, the last ≤ max); rows without activations: zeros."""
    R = hist.shape[0]
    lo, hi = vmin.double(), vmax.double()
    lo = torch.where(torch.isfinite(lo), lo, 0.0)
    lower, upper = _bin_bounds(lo, hi)
    cum = hist.double().cumsum(1)  # [R, B]
    count = cum[:, -1:]
    r = count * torch.arange(1, n + 1, dtype=torch.float64, device=hist.device) / n  # [R, n]
    b = torch.searchsorted(cum.contiguous(), r.contiguous()).clamp(max=hist.shape[1] - 1)
    below = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), 0.0)
    frac = ((r - below) / hist.double().gather(1, b).clamp(min=1)).clamp(0, 1)
    a, z = lower.gather(1, b), upper.gather(1, b)
    geometric = a * (z / a.clamp(min=1e-300)) ** frac
    q = torch.where(a > 0, geometric, a + (z - a) * frac)
    q = torch.minimum(torch.maximum(q, lo[:, None]), hi[:, None]).cummax(1).values
    return torch.where(count > 0, q, 0.0).reshape(R, n)


def display_histogram(
    hist: torch.Tensor, vmin: torch.Tensor, vmax: torch.Tensor, n_bins: int = 50, chunk: int = 2048
) -> torch.Tensor:
    """hist: [R, N_BINS] -> [R, n_bins] int64: the log histogram re-binned to equal-width bins over
    [0, max] (the circuit-tracer card's `histogram`); each log bin's count is spread over the bins
    its range [≥ min, ≤ max] overlaps, in proportion to the overlap, and rounded by largest
    remainders so that the bars sum exactly to the count."""
    out = []
    for s in range(0, hist.shape[0], chunk):
        h = hist[s : s + chunk].double()
        lo = torch.where(torch.isfinite(vmin[s : s + chunk]), vmin[s : s + chunk], 0.0).double()
        hi = vmax[s : s + chunk].double()
        a, z = _bin_bounds(lo, hi)  # [r, B]
        width = (hi / n_bins).clamp(min=1e-300)[:, None, None]
        i = torch.arange(n_bins, dtype=torch.float64, device=h.device)
        left, right = i * width, (i + 1) * width  # [r, 1, n]
        ov = (torch.minimum(z[..., None], right) - torch.maximum(a[..., None], left)).clamp(min=0)
        span = (z - a)[..., None]
        point = span <= 0  # a bin of zero width: where it sits
        inside = (a[..., None] >= left) & ((a[..., None] < right) | (i == n_bins - 1))
        w = torch.where(point, inside.double(), ov / span.clamp(min=1e-300))
        share = (h[..., None] * w).sum(1)  # [r, n]
        floor = share.floor()
        rest = (h.sum(1) - floor.sum(1)).round().long()  # units still to place
        rank = torch.argsort(torch.argsort(floor - share, dim=1, stable=True), dim=1)
        out.append((floor + (rank < rest[:, None]).double()).long())
    return torch.cat(out) if out else torch.zeros(0, n_bins, dtype=torch.long)
