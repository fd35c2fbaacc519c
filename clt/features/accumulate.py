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

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

LO, HI = -3, 3  # histogram range: [1e-3, 1e3) in the CLT's activation units
BINS_PER_DECADE = 32  # ≈ 7.5 % relative bin width
N_BINS = (HI - LO) * BINS_PER_DECADE + 2
STRATA_PER_DECADE = 2  # interval-sample strata (under/overflow strata at the ends)
N_STRATA = (HI - LO) * STRATA_PER_DECADE + 2
assert BINS_PER_DECADE % STRATA_PER_DECADE == 0  # strata edges are histogram edges (stratum_of_bin)
EMPTY = float("inf")  # the order key of an empty slot
# the top-k pass groups a batch's entries by (feature, document) in a dense table while it has at
# most max(TABLE_PER_ENTRY · entries, TABLE_MIN) cells, else by a sort
TABLE_PER_ENTRY, TABLE_MIN = 4, 1 << 20


def log_bin(v: torch.Tensor, per_decade: int) -> torch.Tensor:
    """v > 0 -> bin index: the number of edges 10^(LO + i/per_decade) ≤ v (0 below 10^LO, the
    last at ≥ 10^HI), against the edges rounded to v's dtype. float32 goes through `_bit_table`
    (no search); other dtypes through torch.bucketize."""
    key = (per_decade, v.dtype, v.device)
    if key not in _EDGES:
        _EDGES[key] = bin_edges(per_decade).to(v.device, v.dtype)
        if v.dtype == torch.float32:
            _EDGES[key] = (_EDGES[key], *_bit_table(_EDGES[key]))
    if v.dtype != torch.float32:
        return torch.bucketize(v, _EDGES[key], right=True)
    _, base, edge = _EDGES[key]
    bits = v.reshape(-1).view(torch.int32)
    cell = bits >> CELL_SHIFT
    return base.index_select(0, cell).add_(bits >= edge.index_select(0, cell)).view(v.shape)


_EDGES: dict = {}
CELL_SHIFT = 17  # float32 cells of 2^17 bit patterns: 1/64 of an octave, narrower than a bin


def _bit_table(edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """edges: [n + 1] float32 -> (base, edge) over the 2^(31 − CELL_SHIFT) cells of positive
    float32 bit patterns: base[c] = #edges ≤ the cell's smallest value, edge[c] = the bits of the
    edge inside the cell (at most one: a cell is narrower than a bin), else INT32_MAX. Positive
    floats order as their bits, so bin(v) = base[c] + (bits(v) ≥ edge[c]) exactly."""
    e = edges.view(torch.int32).long()
    lo = torch.arange(1 << (31 - CELL_SHIFT), device=edges.device) << CELL_SHIFT  # a cell's first bits
    base = torch.searchsorted(e, lo, right=True)  # edges ≤ lo
    nxt = e[base.clamp(max=len(e) - 1)]
    inside = (base < len(e)) & (nxt < lo + (1 << CELL_SHIFT))
    assert int(torch.searchsorted(e, lo + (1 << CELL_SHIFT) - 1, right=True).sub(base).max()) <= 1
    edge = torch.where(inside, nxt, torch.iinfo(torch.int32).max).to(torch.int32)
    return base, edge


def bin_edges(per_decade: int = BINS_PER_DECADE) -> torch.Tensor:
    """The inner edges 10^LO … 10^HI of `log_bin` ([n + 1], float64)."""
    n = (HI - LO) * per_decade
    return torch.tensor([10.0 ** (LO + i / per_decade) for i in range(n + 1)], dtype=torch.float64)


def priority(layer: torch.Tensor, feature: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random priority in [0, 2^52) for (layer, feature, token), as float64 (exact):
    splitmix64's finaliser over the unique id (g · 1000003 + feature) · 131 + layer, on int64 with
    wrap-around."""
    return mix(g * G_MUL + row_key(layer, feature))


G_MUL = 1_000_003 * 131  # the id (g · 1000003 + feature) · 131 + layer = g · G_MUL + row_key


def row_key(layer: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    return feature * 131 + layer


def mix(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """int64 id -> float64 in [0, 2^52): splitmix64's finaliser (logical shifts by masking);
    `inplace` overwrites x (no allocation per step)."""
    x = x if inplace else x.clone()
    x.mul_(-7046029254386353131).add_(1442695040888963407)
    x ^= (x >> 30).bitwise_and_((1 << 34) - 1)
    x.mul_(-4658895280553007687)
    x ^= (x >> 27).bitwise_and_((1 << 37) - 1)
    x.mul_(-7723592293110705685)
    x ^= (x >> 31).bitwise_and_((1 << 33) - 1)
    return x.bitwise_and_((1 << 52) - 1).double()


def stratum_of_bin(b: torch.Tensor) -> torch.Tensor:
    """A histogram bin (`log_bin` at BINS_PER_DECADE) -> its stratum (`log_bin` at
    STRATA_PER_DECADE): the strata edges are every (BINS_PER_DECADE / STRATA_PER_DECADE)-th bin
    edge, the same float64 numbers, so counting them needs no second search."""
    step = BINS_PER_DECADE // STRATA_PER_DECADE
    return torch.div(b + (step - 1), step, rounding_mode="floor")  # ⌈b / step⌉


STRATUM_OF_BIN = stratum_of_bin(torch.arange(N_BINS))  # [N_BINS], a lookup table


def lexsort(*keys: torch.Tensor) -> torch.Tensor:
    """The permutation sorting by keys[0], then keys[1], … (all ascending). The last key only
    breaks ties of the others, so it is sorted by only when the others tie somewhere."""
    perm = _stable_sorts(keys[:-1] if len(keys) > 1 else keys)
    if len(keys) > 1 and not bool(run_starts(*(k[perm] for k in keys[:-1])).all()):
        perm = _stable_sorts(keys)
    return perm


def group_sort(group: torch.Tensor, order: torch.Tensor, idx: torch.Tensor, n_groups: int) -> torch.Tensor:
    """lexsort(group, order, idx) for group in [0, n_groups), order float64, in one sort: of an
    int64 packing the group above the leading bits of order's sortable bit pattern; the exact
    three-key sort only when two packed keys tie (equal orders, or orders equal in those bits)."""
    k = 63 - max(int(n_groups - 1).bit_length(), 1)  # bits left for the order
    b = order.view(torch.int64)
    key = torch.where(b >= 0, b, b ^ 0x7FFF_FFFF_FFFF_FFFF)  # float64 order as int64 order
    key >>= 64 - k
    key += (1 << (k - 1)) + (group << k)
    packed, perm = torch.sort(key)
    if bool((packed[1:] == packed[:-1]).any()):
        return lexsort(group, order, idx)
    return perm


def _stable_sorts(keys) -> torch.Tensor:
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
        return self.order[:, -1].index_select(0, group)

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

    def offer(self, e: Entries, drop: torch.Tensor | None = None) -> None:
        """Merge candidate entries into the buffer. Sorting sees only the scalar keys; the contexts
        of the entries that keep or get a slot are gathered once at the end. `drop` (with dedup):
        the caller did the dedup: no two candidates share a (group, document), a candidate beats
        the buffer's entry of its document, and `drop` holds those entries' flat slots
        (group · cap + rank); None: a sort finds them."""
        if e.group.numel() == 0:
            return
        dev, cap = e.group.device, self.cap
        in_order = bool((e.group[1:] >= e.group[:-1]).all())
        groups = torch.unique_consecutive(e.group) if in_order else torch.unique(e.group)
        filled = self.idx.index_select(0, groups) >= 0  # [G, cap]
        if drop is not None and len(drop):
            at = torch.searchsorted(groups, torch.div(drop, cap, rounding_mode="floor"))
            filled[at, drop % cap] = False
        slot_of_old = (groups[:, None] * cap + torch.arange(cap, device=dev))[filled]  # flat slots
        M = len(e.group)
        group = torch.cat([torch.div(slot_of_old, cap, rounding_mode="floor"), e.group])
        order, idx, val, doc = (
            torch.cat([getattr(self, f).view(-1).index_select(0, slot_of_old), getattr(e, f)])
            for f in ("order", "idx", "val", "doc")
        )
        src = torch.cat([slot_of_old, -1 - torch.arange(M, device=dev)])  # ≥ 0: an old slot; < 0: candidate
        keep = torch.arange(len(group), device=dev)
        if self.dedup and drop is None:  # one entry per (group, document): its best
            perm = lexsort(group, doc, order, idx)
            keep = perm[run_starts(group[perm], doc[perm])]
        perm = keep[group_sort(group[keep], order[keep], idx[keep], self.order.shape[0])]
        start = run_starts(group[perm])
        pos = torch.arange(len(perm), device=dev)
        rank = pos - torch.cummax(torch.where(start, pos, 0), 0).values
        perm, rank = perm[rank < cap], rank[rank < cap]
        # A group's filled slots never become fewer (every old entry is a candidate, and dedup drops
        # an old entry only for a better one of its document), so writing ranks 0 … n−1 of every
        # group overwrites all its old slots: nothing to clear. Contexts move only where an entry
        # changes slot; the candidates' are gathered in group order.
        dst, sr = group[perm] * cap + rank, src[perm]
        for f, x in (("order", order), ("idx", idx), ("val", val), ("doc", doc)):
            getattr(self, f).view(-1).index_copy_(0, dst, x[perm])
        moved = (sr != dst).nonzero().squeeze(1)
        sm, dm = sr[moved], dst[moved]
        old, new = (sm >= 0).nonzero().squeeze(1), (sm < 0).nonzero().squeeze(1)
        C = self.tok.shape[-1]
        tok, act = self.tok.view(-1, C), self.act.view(-1, C)
        kept = tok.index_select(0, sm[old]), act.index_select(0, sm[old])  # read before any write
        if len(new):
            t_new, a_new = e.context(-1 - sm[new])
            tok.index_copy_(0, dm[new], t_new)
            act.index_copy_(0, dm[new], a_new)
        tok.index_copy_(0, dm[old], kept[0])
        act.index_copy_(0, dm[old], kept[1])

    def state(self) -> dict:
        return {f: getattr(self, f) for f in self.FIELDS}

    def load(self, state: dict) -> None:
        for f in self.FIELDS:
            getattr(self, f).copy_(state[f])


class _Context:
    """The contexts of one batch: for entries at tokens g (rows `row` of the accumulator), the C
    tokens around each (same window and document) and the feature's activation on them."""

    def __init__(self, acts, row0, tokens, docs, counted, g0, per, left, right):
        self.acts, self.row0, self.docs, self.counted = acts, row0, docs, counted
        self.g0, self.n = g0, len(tokens)
        self.tokens = tokens.to(torch.int32)
        dev = tokens.device
        self.widths = torch.tensor([a.shape[1] for a in acts], device=dev)
        self.ends = self.widths.cumsum(0)  # the columns of layer i: starts[i] … ends[i] − 1
        self.starts = self.ends - self.widths
        self.base = self.starts * self.n  # where layer i's a begins in all of them, flattened in order
        self.offs = torch.arange(-left, right + 1, device=dev)
        # the context of position p: [lo[p], hi[p]), its window ∩ its run of one document id
        pos = torch.arange(self.n, device=dev)
        w0 = pos // per * per
        new_run = run_starts(w0, docs)
        self.lo = torch.cummax(torch.where(new_run, pos, 0), 0).values
        end = torch.where(new_run.roll(-1), pos + 1, self.n).flip(0)
        self.hi = torch.cummin(end, 0).values.flip(0)

    def offer(self, buf: SlotBuffer, group, row, order, g, val, drop=None) -> None:
        if group.numel() == 0:
            return
        p = g - self.g0  # [M] position in the batch
        col = row - self.row0  # column among the layers' activations
        buf.offer(Entries(group, order, g, val, self.docs[p], lambda i: self.gather(p[i], col[i])), drop)

    def gather(self, p: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p, col: [m] batch positions and activation columns -> (tok [m, C] int32, act [m, C]
        f16): the context tokens (-1 outside the window, the document or the counted positions)
        and the feature's activation on them. One gather per layer, over entries in layer order
        (the buffers offer them by row: sorted already)."""
        lay = torch.searchsorted(self.ends, col, right=True)
        if len(lay) > 1 and not bool((lay[1:] >= lay[:-1]).all()):
            by_layer = torch.argsort(lay, stable=True)
            tok, act = self.gather(p[by_layer], col[by_layer])
            out = torch.empty_like(tok), torch.empty_like(act)
            out[0][by_layer], out[1][by_layer] = tok, act
            return out
        q = p[:, None] + self.offs  # [m, C]
        off = (q < self.lo[p][:, None]) | (q >= self.hi[p][:, None])
        qc = q.clamp_(0, max(self.n - 1, 0))
        if self.counted is not None:
            off |= ~self.counted[qc]
        tok = torch.take(self.tokens, qc).masked_fill_(off, -1)
        flat = qc * self.widths[lay][:, None]
        flat += (self.base[lay] + col - self.starts[lay])[:, None]  # into all a, flattened in order
        act = torch.empty(q.shape, dtype=self.acts[0].dtype, device=q.device)
        if isinstance(self.acts, torch.Tensor):  # [layers, n, F]: that flat order is its memory
            torch.take(self.acts, flat, out=act)
        else:
            at, counts = 0, torch.bincount(lay, minlength=len(self.acts)).tolist()
            for a, n, base in zip(self.acts, counts, self.base):
                if n:
                    torch.take(a, flat[at : at + n] - base, out=act[at : at + n])
                    at += n
        return tok, act.masked_fill_(off, 0).half()


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
        self.total = torch.zeros(R, dtype=torch.float64, device=device)
        self.max = torch.zeros(R, dtype=torch.float32, device=device)
        self.min = torch.full((R,), float("inf"), dtype=torch.float32, device=device)
        self.hist = torch.zeros(R, N_BINS, dtype=torch.int32, device=device)
        self.top = SlotBuffer(R, top_k, C, dedup=True, device=device)
        self.row_layer = torch.repeat_interleave(torch.arange(n_layers), torch.tensor(self.widths)).to(device)
        self.row_feature = torch.cat([self.feature_ids(layer) for layer in range(n_layers)]).to(device)
        self.strata = SlotBuffer(R * N_STRATA, samples, C, dedup=False, device=device)
        self.row_key = row_key(self.row_layer, self.row_feature)  # [R] the priority's per-row part
        self._one = torch.ones(0, dtype=torch.int32, device=device)
        self._scratch = torch.empty(0, device=device)

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
        entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """a: [n, F_l] activations of layer `layer`'s selected features on n = W·per tokens (whole
        windows, global positions g0 …), or a list of them for layers `layer`, `layer` + 1, … (one
        call for several layers saves per-call work), or those stacked ([layers, n, F], contiguous:
        one gather for all their contexts); tokens, docs: [n]; counted: [n] bool (False =
        excluded position: no statistics, never an example; default all); entries: per layer of
        `a`, its non-zero entries (t, j, v), a[t, j] = v > 0, in any order (what
        `encode_layer_entries` gives; default: a scan of a). Call `add_tokens` once per batch."""
        acts = a if isinstance(a, list) or a.dim() == 3 else [a]
        if entries is None:
            entries = []
            for al in acts:
                t, j = (al > 0).nonzero(as_tuple=True)
                entries.append((t, j, al[t, j]))
        # the non-zeros of every layer: token t, accumulator row, value v (float32, > 0)
        t = torch.cat([e[0] for e in entries])
        row = torch.cat([e[1] for e in entries])
        v = torch.cat([e[2] for e in entries]).float()
        at = 0
        for i, e in enumerate(entries):
            row[at : at + len(e[1])] += self.offsets[layer + i]
            at += len(e[1])
        if counted is not None:
            keep = counted[t].nonzero().squeeze(1)
            t, row, v = t[keep], row[keep], v[keep]
        self.total.index_add_(0, row, v.double())
        self.max.scatter_reduce_(0, row, v, "amax")
        self.min.scatter_reduce_(0, row, v, "amin")
        hbin = log_bin(v, BINS_PER_DECADE)
        cell = row * N_BINS
        cell += hbin
        self.hist.view(-1).index_add_(0, cell, self._ones(len(cell)))  # (and so the count)
        g = t + g0
        ctx = _Context(acts, self.offsets[layer], tokens, docs, counted, g0, per, self.left, self.right)
        self._offer_top(t, row, v, docs, g0, layer, len(acts), ctx)

        # interval samples: bottom-s priority per (feature, stratum)
        prio = self.row_key.index_select(0, row)
        prio.add_(g, alpha=G_MUL)
        prio = mix(prio, inplace=True)
        srow = row * N_STRATA
        srow += STRATUM_OF_BIN.to(hbin.device).index_select(0, hbin)
        k = (prio <= self.strata.worst(srow)).nonzero().squeeze(1)
        ctx.offer(self.strata, srow[k], row[k], prio[k], g[k], v[k])

    def _offer_top(self, t, row, v, docs, g0: int, layer: int, n_layers: int, ctx: _Context) -> None:
        """The best token of every (feature, document) of the batch (value desc, then token asc),
        offered to the top-k buffer. Both come from one maximum of the int64 key
        value-bits · 2^32 + (n − 1 − t): positive float32 values order as their bits."""
        n = len(docs)
        udocs, dl = torch.unique(docs, return_inverse=True)  # the batch's D documents
        D, r0, r1 = len(udocs), self.offsets[layer], self.offsets[layer + n_layers]
        dense = (r1 - r0) * D <= max(TABLE_PER_ENTRY * len(t), TABLE_MIN)
        if not dense:  # too many cells for a table: sort the few entries that can still get in
            hope = (v.double() >= -self.top.worst(row)).nonzero().squeeze(1)
            t, row, v = t[hope], row[hope], v[hope]
        key = row - r0
        key *= D
        key += dl.index_select(0, t)  # the (feature, document) cell
        packed = v.view(torch.int32).to(torch.int64)
        packed <<= 32
        packed -= t
        packed += n - 1
        if dense:
            table = torch.zeros((r1 - r0) * D, dtype=torch.int64, device=v.device)
            table.scatter_reduce_(0, key, packed, "amax")
            cells = table.nonzero().squeeze(1)
            packed = table[cells]
        else:
            cells, inv = torch.unique(key, return_inverse=True)
            packed = torch.zeros(len(cells), dtype=torch.int64, device=v.device).scatter_reduce_(
                0, inv, packed, "amax"
            )
        best = (packed >> 32).to(torch.int32).view(torch.float32)
        first = g0 + n - 1 - (packed & 0xFFFFFFFF)
        crow, cdoc = torch.div(cells, D, rounding_mode="floor") + r0, udocs[cells % D]
        order = -best.double()
        keep = order <= self.top.worst(crow)
        # a document already in the buffer with a better entry: nothing to merge (long documents
        # keep offering the same (feature, document) batch after batch)
        same = self.top.doc[crow] == cdoc[:, None]  # [M, k]
        o, ix = self.top.order[crow], self.top.idx[crow]
        better = same & ((o < order[:, None]) | ((o == order[:, None]) & (ix < first[:, None])))
        k = (keep & ~better.any(1)).nonzero().squeeze(1)
        # the offered candidates' documents' old entries (worse: `better` is False) give way
        m, j = same[k].nonzero(as_tuple=True)
        ctx.offer(self.top, crow[k], crow[k], order[k], first[k], best[k], drop=crow[k][m] * self.top_k + j)

    def scratch_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A work buffer kept between batches (not state): a fresh buffer of tens of MiB per batch
        costs its page faults every time."""
        n = math.prod(shape)
        if self._scratch.numel() < n or self._scratch.dtype != dtype:
            self._scratch = torch.empty(n, dtype=dtype, device=self._scratch.device)
        return self._scratch[:n].view(shape)

    def _ones(self, n: int) -> torch.Tensor:
        """n int32 ones (a view of a kept buffer: no allocation per batch)."""
        if self._one.numel() < n:
            self._one = torch.ones(max(n, 2 * self._one.numel()), dtype=torch.int32, device=self._one.device)
        return self._one[:n]

    @property
    def count(self) -> torch.Tensor:
        """[R] int64 firings per row: the histogram counts every non-zero once."""
        return self.hist.sum(1)

    def add_tokens(self, n: int) -> None:
        self.n_tokens += int(n)

    def feature_ids(self, layer: int) -> torch.Tensor:
        f = self.features[layer]
        return torch.arange(self.F, device=self.hist.device) if f is None else f.to(self.hist.device)

    # -- merging and saving ---------------------------------------------------------------------
    STATS = ("total", "max", "min", "hist")

    def merge(self, other: CardAccumulator) -> None:
        """Add another accumulator's tokens (a disjoint token range) to this one."""
        self.n_tokens += other.n_tokens
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
