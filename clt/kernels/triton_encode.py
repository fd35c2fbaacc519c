"""Fused CLT encode in Triton: h = x W_encᵀ + b_enc and the activation epilogue, every layer in
one launch.

    x: [N, L, d] (normalised), W_enc: [L, F, d], b_enc: [L, F], θ: [L, F] -> h, a: [N, L, F]
    a = h · 1[h > θ] (JumpReLU) or ReLU(h) (kind 1) or nothing (kind 0: h only, for TopK)

The backward is torch: it sends gradient through both outputs the loss uses (h for the
pre-activation and AuxK terms, a for reconstruction and sparsity), with JumpReLU's
rectangle-kernel pseudo-gradients (docs/DESIGN.md §1), so inactive features within the bandwidth of θ
get their θ gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NONE, RELU, JUMPRELU = 0, 1, 2


@triton.jit
def _encode_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    th_ptr,
    h_ptr,
    a_ptr,
    N,
    L,
    F,
    D,
    KIND: tl.constexpr,
    FP32: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    pid_m, pid_n, layer = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mm, mn = rm < N, rn < F
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    x_row = rm.to(tl.int64)[:, None] * (L * D) + layer * D  # x[n, layer, :]
    w_row = layer * F * D + rn.to(tl.int64)[None, :] * D  # W_enc[layer, f, :]
    for k0 in range(0, D, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < D
        x = tl.load(x_ptr + x_row + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        w = tl.load(w_ptr + w_row + rk[:, None], mask=mk[:, None] & mn[None, :], other=0.0)  # [BK, BN]
        if FP32:  # true fp32 products (the CUDA default for fp32 dot is TF32, ~1e-3 relative)
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    h = acc + tl.load(b_ptr + layer * F + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    out = rm.to(tl.int64)[:, None] * (L * F) + layer * F + rn[None, :]
    m2 = mm[:, None] & mn[None, :]
    tl.store(h_ptr + out, h, mask=m2)
    if KIND == 2:
        th = tl.load(th_ptr + layer * F + rn, mask=mn, other=0.0).to(tl.float32)
        tl.store(a_ptr + out, tl.where(h > th[None, :], h, 0.0), mask=m2)
    elif KIND == 1:
        tl.store(a_ptr + out, tl.maximum(h, 0.0), mask=m2)


class FusedEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, theta, kind: int, bandwidth: float, ste_to_input: bool):
        n, L, d = x.shape
        F = W_enc.shape[1]
        x, W = x.contiguous(), W_enc.contiguous()
        h = torch.empty(n, L, F, device=x.device, dtype=torch.float32)
        a = torch.empty_like(h) if kind != NONE else h.new_empty(0)  # kind 0: h only
        th = theta.contiguous() if theta is not None else b_enc
        grid = (triton.cdiv(n, 32), triton.cdiv(F, 32), L)
        _encode_kernel[grid](
            x,
            W,
            b_enc.contiguous(),
            th,
            h,
            a,
            n,
            L,
            F,
            d,
            KIND=kind,
            FP32=x.dtype == torch.float32,
            BM=32,
            BN=32,
            BK=32,
        )
        ctx.save_for_backward(x, W, h, theta if theta is not None else torch.empty(0))
        ctx.kind, ctx.bandwidth, ctx.ste = kind, bandwidth, ste_to_input
        return h, a

    @staticmethod
    def backward(ctx, grad_h, grad_a):
        x, W, h, theta = ctx.saved_tensors
        gh = grad_h if grad_h is not None else torch.zeros_like(h)
        grad_theta = None
        if ctx.kind != NONE and grad_a is not None:
            if ctx.kind == RELU:
                gh = gh + grad_a * (h > 0)
            else:
                eps = ctx.bandwidth
                kernel = (theta / eps) * ((h - theta).abs() < eps / 2)  # (θ/ε)·K((h−θ)/ε)
                gh = gh + grad_a * (h > theta)
                if ctx.ste:
                    gh = gh + grad_a * kernel
                grad_theta = -(grad_a * kernel).sum(0)
        grad_x = torch.einsum("nlf,lfd->nld", gh, W) if ctx.needs_input_grad[0] else None
        grad_W = torch.einsum("nlf,nld->lfd", gh, x) if ctx.needs_input_grad[1] else None
        grad_b = gh.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_W, grad_b, grad_theta, None, None, None


def encode_triton(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    theta: torch.Tensor | None,
    activation: str,
    bandwidth: float = 1.0,
    ste_to_input: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, L, d] normalised input -> (h, a): [N, L, F]. activation: jumprelu | relu | none."""
    kind = {"none": NONE, "relu": RELU, "jumprelu": JUMPRELU}[activation]
    h, a = FusedEncode.apply(x, W_enc, b_enc, theta, kind, bandwidth, ste_to_input)
    return h, (h if kind == NONE else a)


@triton.jit
def _weight_grad_kernel(
    start_ptr,
    tok_ptr,
    g_ptr,
    x_ptr,
    dw_ptr,
    c_ptr,
    xsum_ptr,
    L,
    F,
    D,
    HAS_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    key = tl.program_id(0).to(tl.int64)  # (layer, feature) = divmod(key, F)
    layer = key // F
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    lo = tl.load(start_ptr + key)
    hi = tl.load(start_ptr + key + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_C:  # a per-(layer, feature) constant ∂h at every token: c · Σ_n x[n, layer]
        acc += tl.load(c_ptr + key) * tl.load(xsum_ptr + layer * D + offs, mask=mask, other=0.0)
    for e in range(lo, hi):  # this (layer, feature)'s non-zero ∂h, in token order
        n = tl.load(tok_ptr + e).to(tl.int64)
        v = tl.load(g_ptr + e).to(tl.float32)
        acc += v * tl.load(x_ptr + (n * L + layer) * D + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dw_ptr + key * D + offs, acc, mask=mask)  # (0 where no token had a non-zero ∂h)


def encoder_weight_grad_triton(dh: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dh: [N, L, F] (mostly zeros), x: [N, L, d] -> ∂W_enc = Σ_n dh[n, l, f] x[n, l]: [L, F, d]
    (fp32), reading x only at the non-zero dh."""
    tok, lay, feat = dh.nonzero(as_tuple=True)  # (token-major)
    return weight_grad_entries_triton(x, tok, lay, feat, dh[tok, lay, feat], dh.shape[-1])


def weight_grad_entries_triton(
    x: torch.Tensor,
    tok: torch.Tensor,
    lay: torch.Tensor,
    feat: torch.Tensor,
    g: torch.Tensor,
    F: int,
    const: torch.Tensor | None = None,
) -> torch.Tensor:
    """∂W_enc[l, f] = const[l, f] Σ_n x[n, l] + Σ_{e: (lay, feat)_e = (l, f)} g_e x[tok_e, l]: [L, F, d]
    (fp32). The entries' (layer, feature) keys sorted stably, one program per (layer, feature,
    block of d) sums its run in token order (deterministic, no atomics; every row written once).
    `const`: [L, F] or None (JumpReLU's pre-activation gradient, the same at every token)."""
    n, L, d = x.shape
    key = lay * F + feat
    order = torch.argsort(key, stable=True)
    starts = torch.zeros(L * F + 1, dtype=torch.int64, device=x.device)
    starts[1:] = (
        torch.zeros(L * F, dtype=torch.int64, device=x.device)
        .scatter_add_(0, key, torch.ones_like(key))
        .cumsum(0)
    )
    dW = torch.empty(L, F, d, device=x.device, dtype=torch.float32)
    xf = x.float().contiguous()
    c = const.float().contiguous() if const is not None else dW
    xsum = xf.sum(0) if const is not None else dW
    BLOCK_D = 64
    _weight_grad_kernel[(L * F, triton.cdiv(d, BLOCK_D))](
        starts,
        tok[order].contiguous(),
        g[order].float().contiguous(),
        xf,
        dW,
        c,
        xsum,
        L,
        F,
        d,
        HAS_C=const is not None,
        BLOCK_D=BLOCK_D,
    )
    return dW
