"""Plain-torch reference paths for the CLT decode: the CPU implementation, the test oracle for the
Triton kernels, and their fallback.

    ŷ[:, t] = Σ_{s ≤ t} a[:, s] @ W_dec[s][:, t − s]        a: [N, L, F], W_dec[s]: [F, L − s, d]

`support` (optional, [N, L, F] bool) is the set of positions whose gradient ∂L/∂a the caller
needs: the active features, plus for JumpReLU the inactive ones within the bandwidth of θ (their
θ pseudo-gradient reads ∂L/∂a there). A sparse decode gives exact gradients on its support only;
the dense decode gives them everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import cpu


def decode_dense(a: torch.Tensor, W_dec: list[torch.Tensor]) -> torch.Tensor:
    """a: [N, L, F], W_dec[s]: [F, L − s, d] -> [N, L, d] (dense matmuls, gradients everywhere)."""
    n, L, _ = a.shape
    d = W_dec[0].shape[-1]
    contribs = [a[:, s] @ W_dec[s].reshape(W_dec[s].shape[0], -1) for s in range(L)]  # [N, (L − s)·d]
    return sum_shifted(contribs, n, L, d)


def decode_sparse(
    a: torch.Tensor, W_dec: list[torch.Tensor], support: torch.Tensor | None = None
) -> torch.Tensor:
    """Same output as `decode_dense`, reading only the decoder rows on the support (default:
    the active features), one (source, target) slab at a time (`_TiledDecode`)."""
    n, L, F = a.shape
    mask = (a.detach() != 0) if support is None else support
    s, rows, cols = mask.transpose(0, 1).nonzero(as_tuple=True)  # sorted by (source layer, token)
    vals = a.reshape(-1)[(rows * L + s) * F + cols]  # differentiable gather of the entries
    counts = torch.bincount(s, minlength=L).tolist()
    return decode_entries(rows.split(counts), cols.split(counts), vals.split(counts), W_dec, n)


def decode_entries(
    rows: Sequence[torch.Tensor],
    cols: Sequence[torch.Tensor],
    vals: Sequence[torch.Tensor],
    W_dec: list[torch.Tensor],
    n: int,
) -> torch.Tensor:
    """The decode from its entries: a[rows[s][i], s, cols[s][i]] = vals[s][i] for each source
    layer s, rows[s] sorted (token order) -> [n, L, d]. Gradients for vals and W_dec. The sums run
    in the decoder's dtype: under bf16 autocast the (few) bf16 values are cast up, not the weights
    down, so the fp32 kernel serves mixed precision too."""
    offsets = [bag_offsets(r, n) for r in rows]
    L = len(W_dec)
    vals = [v.to(W_dec[0].dtype) for v in vals]
    return _TiledDecode.apply(L, list(rows), list(cols), offsets, *vals, *W_dec)


class _TiledDecode(torch.autograd.Function):
    """ŷ[:, t] = Σ_{s ≤ t} A_s W_dec[s][:, t − s] with A_s the sparse [n, F] activations of source s,
    computed one (s, t) slab W_dec[s][:, t − s] ([F, d]) at a time so that the slab stays in cache
    while every entry reads its row (per source layer, whole (L − s)·d rows were re-read from
    memory once per entry: 2-3x slower on CPU). Backward, per slab:
        ∂W_dec[s][f, t − s] = Σ_{i: cols=f} vals[i] ∂ŷ[rows[i], t]   (A_sᵀ ∂ŷ[:, t]: a bag per feature)
        ∂vals[i] += ⟨W_dec[s][cols[i], t − s], ∂ŷ[rows[i], t]⟩
    so neither pass materialises a gathered [entries, d] tensor. Entries whose value is 0 (on the
    support, not active: JumpReLU's band) change neither ŷ nor ∂W_dec: the forward and ∂W_dec read
    the non-zero entries only, ∂vals all of them. Two implementations of the same loops: the C
    kernel of `kernels.cpu` (fp32 on CPU, where it builds) and embedding_bag per slab."""

    @staticmethod
    def forward(ctx, L: int, rows, cols, offsets, *vals_and_W):
        vals, Ws = vals_and_W[:L], vals_and_W[L:]
        n = offsets[0].numel()
        ctx.kernel = cpu.usable(*vals, *Ws)
        active = _nonzero_entries(rows, cols, offsets, vals, n)  # (rows, cols, offsets, vals)
        decode = cpu.forward if ctx.kernel else _bag_forward
        out = decode(active[1], active[3], active[2], Ws, n)
        ctx.L, ctx.lists, ctx.active = L, (rows, cols, offsets), active
        ctx.save_for_backward(*Ws)  # the values' part of the backward reads only the active entries
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        L, (rows, cols, offsets) = ctx.L, ctx.lists
        Ws = ctx.saved_tensors
        need_vals, need_W = any(ctx.needs_input_grad[4 : 4 + L]), any(ctx.needs_input_grad[4 + L :])
        F = Ws[0].shape[0]
        g_vals: list = [None] * L
        g_W: list = [None] * L
        if need_W:  # the transposed pattern: the non-zero entries grouped by feature
            a_rows, a_cols, _, a_vals = ctx.active
            if ctx.kernel:
                t_rows, t_vals, f_offsets = cpu.group_by_feature(a_rows, a_cols, a_vals, F)
            else:
                order = [torch.argsort(c, stable=True) for c in a_cols]
                t_rows = [r[o] for r, o in zip(a_rows, order)]
                t_vals = [v[o] for v, o in zip(a_vals, order)]
                f_offsets = [bag_offsets(c, F) for c in a_cols]
        if ctx.kernel:
            g = grad.contiguous()
            if need_vals:
                g_vals = cpu.backward_vals(cols, offsets, Ws, g)
            if need_W:
                g_W = cpu.backward_W(t_rows, t_vals, f_offsets, Ws, g)
        else:
            g = grad.transpose(0, 1).contiguous()  # [L, n, d]: each target's rows contiguous
            if need_vals:
                g_vals = _bag_backward_vals(rows, cols, offsets, Ws, g)
            if need_W:
                g_W = _bag_backward_W(t_rows, t_vals, f_offsets, Ws, g)
        g_vals = [gv if ctx.needs_input_grad[4 + s] else None for s, gv in enumerate(g_vals)]
        g_W = [gw if ctx.needs_input_grad[4 + L + s] else None for s, gw in enumerate(g_W)]
        return (None, None, None, None, *g_vals, *g_W)


def _nonzero_entries(rows, cols, offsets, vals, n: int) -> tuple[list, list, list, list]:
    """The entries whose value is not 0, per source layer: (rows, cols, offsets, vals detached);
    a layer's own lists where every value is non-zero."""
    out: tuple[list, list, list, list] = ([], [], [], [])
    for r, c, o, v in zip(rows, cols, offsets, vals):
        v = v.detach()
        on = v != 0
        if not bool(on.all()):
            r, c, v = r[on], c[on], v[on]
            o = bag_offsets(r, n)
        for lst, x in zip(out, (r, c, o, v)):
            lst.append(x)
    return out


def _bag_forward(cols, vals, offsets, Ws, n: int) -> torch.Tensor:
    """The forward by embedding_bag, one contiguous copy of each slab (embedding_bag is ~4x slower
    on a strided one) -> [n, L, d]."""
    L, d = len(Ws), Ws[0].shape[-1]
    out = Ws[0].new_zeros(L, n, d)
    slab = Ws[0].new_empty(Ws[0].shape[0], d)  # one reused buffer (fresh memory is slow on CPU)
    for s in range(L):
        for t in range(s, L):
            slab.copy_(Ws[s][:, t - s])
            out[t] += nn.functional.embedding_bag(
                cols[s], slab, offsets[s], mode="sum", per_sample_weights=vals[s]
            )
    return out.transpose(0, 1)


def _bag_backward_vals(rows, cols, offsets, Ws, g: torch.Tensor) -> list[torch.Tensor]:
    """∂vals by embedding_bag's own per-entry weight gradient (mode 0: sum); g: [L, n, d]."""
    L = len(Ws)
    slab = Ws[0].new_empty(Ws[0].shape[0], g.shape[-1])
    g_vals = []
    for s in range(L):
        gv = g.new_zeros(cols[s].numel())
        for t in range(s, L):
            slab.copy_(Ws[s][:, t - s])
            gv += _bag_weight_grad(g[t], slab, cols[s], offsets[s], rows[s], 0)
        g_vals.append(gv)
    return g_vals


def _bag_backward_W(t_rows, t_vals, f_offsets, Ws, g: torch.Tensor) -> list[torch.Tensor]:
    """∂W_dec: a bag per feature over the transposed pattern, per slab; g: [L, n, d]."""
    L = len(Ws)
    g_W = []
    for s in range(L):
        gw = torch.empty_like(Ws[s])
        for t in range(s, L):
            gw[:, t - s] = nn.functional.embedding_bag(
                t_rows[s], g[t], f_offsets[s], mode="sum", per_sample_weights=t_vals[s]
            )
        g_W.append(gw)
    return g_W


_bag_weight_grad = torch.ops.aten._embedding_bag_per_sample_weights_backward


def encoder_matmul(x: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """x: [N, L, d], W_enc: [L, F, d] -> [N, L, F] = einsum("nld,lfd->nlf"). Its backward takes
    W_enc's gradient from the non-zero ∂h only when at most 10% of them are non-zero (TopK,
    BatchTopK: the selected pairs and AuxK's): on CPU in fp32 (no autocast) by the C kernel, on
    CUDA by the Triton kernel (`triton_encode.encoder_weight_grad_triton`); otherwise, and
    everywhere else, the dense GEMM."""
    if not W_enc.requires_grad or torch.is_autocast_enabled(x.device.type):
        return torch.einsum("nld,lfd->nlf", x, W_enc)
    if (x.device.type == "cpu" and cpu.usable(x, W_enc)) or (x.is_cuda and _triton()):
        return _SparseGradEncoder.apply(x, W_enc)
    return torch.einsum("nld,lfd->nlf", x, W_enc)


def _triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def encoder_weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_n g[n, l, f] x[n, l]: [L, F, d] from the non-zero g only (C kernel on CPU, Triton on CUDA or
    under TRITON_INTERPRET=1 for CPU tensors without the C kernel)."""
    if g.is_cuda or not cpu.usable(g, x):
        from .triton_encode import encoder_weight_grad_triton

        return encoder_weight_grad_triton(g, x).to(x.dtype)
    return cpu.encoder_weight_grad(g, x)


class _SparseGradEncoder(torch.autograd.Function):
    """h = x W_encᵀ per layer; ∂W_enc[l, f] = Σ_n ∂h[n, l, f] x[n, l] over the non-zero ∂h."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, W_enc)
        return torch.einsum("nld,lfd->nlf", x, W_enc)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, W_enc = ctx.saved_tensors
        gx = torch.einsum("nlf,lfd->nld", g, W_enc) if ctx.needs_input_grad[0] else None
        gW = None
        if ctx.needs_input_grad[1]:
            if torch.count_nonzero(g) <= 0.1 * g.numel():
                gW = encoder_weight_grad(g, x)
            else:
                gW = torch.einsum("nlf,nld->lfd", g, x)
        return gx, gW


def sparse_matmul(a: torch.Tensor, W: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
    """a: [N, F] (mostly zeros) @ W: [F, D] -> [N, D], reading only the rows on the support."""
    mask = (a.detach() != 0) if support is None else support
    rows, cols = mask.nonzero(as_tuple=True)  # (token, feature), row-major
    n = a.shape[0]
    if rows.numel() == 0:
        return a.new_zeros(n, W.shape[1])
    return nn.functional.embedding_bag(
        cols, W, bag_offsets(rows, n), mode="sum", per_sample_weights=a[rows, cols]
    )


def bag_offsets(bag: torch.Tensor, n: int) -> torch.Tensor:
    """bag: [E] bag index of each entry (the entries grouped by bag, bags in order) -> [n], where
    each of the n bags starts (embedding_bag's offsets; an empty bag starts where the next does)."""
    offsets = torch.zeros(n, dtype=torch.long, device=bag.device)
    offsets[1:] = torch.bincount(bag, minlength=n)[:-1].cumsum(0)
    return offsets


def sum_shifted(contribs: list[torch.Tensor], n: int, L: int, d: int) -> torch.Tensor:
    """contribs[s]: [N, (L − s)·d], source s's output for targets s … L−1 -> their sum: [N, L, d]."""
    return _SumShifted.apply(L, d, *contribs)


class _SumShifted(torch.autograd.Function):
    """Forward adds each source's block into its slice of one output; backward hands each source
    a view of the output gradient. (Autograd's own in-place slice updates copied and zero-filled
    the whole [N, L, d] gradient once per source layer: half the step time on CPU.)"""

    @staticmethod
    def forward(ctx, L: int, d: int, *contribs: torch.Tensor) -> torch.Tensor:
        n = contribs[0].shape[0]
        out = contribs[0].new_zeros(n, L, d)
        for s, c in enumerate(contribs):
            out[:, s:] += c.view(n, L - s, d)
        ctx.L = L
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = grad.shape[0]
        return (None, None, *[grad[:, s:].reshape(n, -1) for s in range(ctx.L)])


def to_padded(a: torch.Tensor, support: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense activations -> the padded sparse format of the kernels.

    a: [N, L, F] -> idx: [N, L, K] int64 (−1 in padding slots), val: [N, L, K] (0 in padding;
    differentiable, gathered from a), K = the largest support size of any (token, layer) row
    (ragged rows of BatchTopK / JumpReLU are padded)."""
    mask = (a.detach() != 0) if support is None else support
    counts = mask.sum(-1)  # [N, L]
    K = max(int(counts.max()) if counts.numel() else 0, 1)
    idx = mask.to(torch.float32).topk(K, dim=-1, sorted=True).indices  # support positions first
    valid = torch.arange(K, device=a.device) < counts[..., None]
    idx, _ = torch.where(valid, idx, torch.full_like(idx, a.shape[-1])).sort(dim=-1)  # index order
    valid = idx < a.shape[-1]
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    val = a.gather(-1, safe) * valid
    return torch.where(valid, idx, torch.full_like(idx, -1)), val


def decode_padded(idx: torch.Tensor, val: torch.Tensor, W_dec: list[torch.Tensor]) -> torch.Tensor:
    """Reference decode from the padded format (idx −1 = padding): [N, L, d]."""
    n, L, K = idx.shape
    d = W_dec[0].shape[-1]
    contribs = []
    for s in range(L):
        W = W_dec[s].reshape(W_dec[s].shape[0], -1)
        i = idx[:, s].clamp_min(0)
        v = val[:, s] * (idx[:, s] >= 0)
        contribs.append(nn.functional.embedding_bag(i, W, mode="sum", per_sample_weights=v))
    return sum_shifted(contribs, n, L, d)
