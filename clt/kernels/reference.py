"""Plain-torch reference paths for the CLT decode: the CPU implementation, the test oracle for the
Triton kernels, and their fallback.

    ŷ[:, t] = Σ_{s ≤ t} a[:, s] @ W_dec[s][:, t − s]        a: [N, L, F], W_dec[s]: [F, L − s, d]

`support` (optional, [N, L, F] bool) is the set of positions whose gradient ∂L/∂a the caller
needs: the active features, plus for JumpReLU the inactive ones within the bandwidth of θ (their
θ pseudo-gradient reads ∂L/∂a there). A sparse decode gives exact gradients on its support only;
the dense decode gives them everywhere.
"""

from __future__ import annotations

import torch
from torch import nn


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
    the active features): per source layer an embedding-bag sum over each token's ragged set."""
    n, L, _ = a.shape
    d = W_dec[0].shape[-1]
    contribs = [
        sparse_matmul(
            a[:, s], W_dec[s].reshape(W_dec[s].shape[0], -1), None if support is None else support[:, s]
        )
        for s in range(L)
    ]
    return sum_shifted(contribs, n, L, d)


def sparse_matmul(a: torch.Tensor, W: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
    """a: [N, F] (mostly zeros) @ W: [F, D] -> [N, D], reading only the rows on the support."""
    mask = (a.detach() != 0) if support is None else support
    rows, cols = mask.nonzero(as_tuple=True)  # (token, feature), row-major
    n = a.shape[0]
    if rows.numel() == 0:
        return a.new_zeros(n, W.shape[1])
    offsets = torch.zeros(n, dtype=torch.long, device=a.device)
    offsets[1:] = torch.bincount(rows, minlength=n)[:-1].cumsum(0)
    return nn.functional.embedding_bag(cols, W, offsets, mode="sum", per_sample_weights=a[rows, cols])


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
