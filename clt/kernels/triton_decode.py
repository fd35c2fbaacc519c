"""Sparse cross-layer decode in Triton, as a torch.autograd.Function.

Input: the active features of every source layer in the padded format of `kernels.reference.to_padded`
(idx: [N, L, K] int64 with −1 for padding, val: [N, L, K]) and the source-major decoders
W_dec[s]: [F, L − s, d]. Output: ŷ: [N, L, d] = Σ_{s ≤ t} Σ_j val[n, s, j] · W_dec[s][idx[n, s, j], t − s].

- forward: one launch per source layer s; a program owns (token n, target t, a block of d) and
  sums its K decoder rows; accumulation in fp32; every output element is written by one program
  per launch and launches run in order, so the result is deterministic (no atomics).
- backward, weights and values in one feature-major pass: ∂L/∂W_dec[s][f] = Σ_{(n, j): idx = f}
  val[n, s, j] · g[n, s:, :] and ∂L/∂val[n, s, j] = <g[n, s:, :], W_dec[s][idx[n, s, j]]>. The slots
  are sorted by feature (stable); a program owns one block of one feature's row, reads that block of
  W once, and for each of the feature's slots in a fixed order adds val · g into ∂W and writes the
  block's partial dot product of ∂val (summed over blocks afterwards): deterministic, no atomics,
  each decoder row read once per step rather than once per slot. Each row of ∂W is written once
  (zeros where the feature did not fire: no separate zero fill), and the feature runs come from a
  scatter-add, so the backward never waits for the host (no data-dependent shapes). Without a
  weight gradient, ∂val alone: one dot product of length (L − s)·d per slot.
Offsets into W_dec are int64 (the full decoder passes 2³¹ elements at real sizes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_fwd(
    idx_ptr, val_ptr, w_ptr, out_ptr, K, LS, D, out_row, out_off, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
):
    n = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)  # target layer relative to the source: 0 … L − s − 1
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        f = tl.load(idx_ptr + n * K + offs_k, mask=mask_k, other=-1)
        v = tl.load(val_ptr + n * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        live = f >= 0
        rows = (tl.where(live, f, 0).to(tl.int64) * LS + t) * D
        w = tl.load(w_ptr + rows[:, None] + offs_d[None, :], mask=live[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
    o = out_ptr + n * out_row + out_off + t * D + offs_d
    tl.store(o, tl.load(o, mask=mask_d, other=0.0) + acc, mask=mask_d)


@triton.jit
def _decode_grad_val(
    idx_ptr, gval_ptr, w_ptr, g_ptr, K, R, g_row, g_off, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr
):
    n = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    f = tl.load(idx_ptr + n * K + offs_k, mask=mask_k, other=-1)
    live = f >= 0
    rows = tl.where(live, f, 0).to(tl.int64) * R  # R = (L − s)·d: one feature's rows, contiguous
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        g = tl.load(g_ptr + n * g_row + g_off + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] + offs_r[None, :], mask=live[:, None] & mask_r[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
    tl.store(gval_ptr + n * K + offs_k, tl.where(live, acc, 0.0), mask=mask_k)


@triton.jit
def _decode_grad_fused(
    start_ptr,
    slot_ptr,
    val_ptr,
    w_ptr,
    g_ptr,
    gw_ptr,
    part_ptr,
    K,
    R,
    NB,
    g_row,
    g_off,
    BLOCK_R: tl.constexpr,
):
    # one feature row's block: W_dec[s][f, block] read once; for each of the feature's slots, val · g
    # into ∂W and the block's partial ⟨g, W⟩ of ∂val (summed over the blocks afterwards)
    f = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1)
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    w = tl.load(w_ptr + f * R + offs_r, mask=mask_r, other=0.0).to(tl.float32)
    lo = tl.load(start_ptr + f)
    hi = tl.load(start_ptr + f + 1)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for e in range(lo, hi):  # this feature's slots, in token order (stable sort)
        slot = tl.load(slot_ptr + e).to(tl.int64)
        v = tl.load(val_ptr + slot).to(tl.float32)
        n = slot // K
        g = tl.load(g_ptr + n * g_row + g_off + offs_r, mask=mask_r, other=0.0).to(tl.float32)
        acc += v * g
        tl.store(part_ptr + e * NB + rb, tl.sum(w * g, axis=0))
    tl.store(gw_ptr + f * R + offs_r, acc, mask=mask_r)  # (0 for a feature that did not fire)


BLOCK_D = 64
BLOCK_K = 16
BLOCK_R = 128


class SparseDecode(torch.autograd.Function):
    """(idx [N, L, K], val [N, L, K], *W_dec) -> ŷ [N, L, d]; gradients for val and every W_dec[s]."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, val: torch.Tensor, *W_dec: torch.Tensor) -> torch.Tensor:
        n, L, K = idx.shape
        d = W_dec[0].shape[-1]
        idx_s = [idx[:, s].contiguous() for s in range(L)]
        val_s = [val[:, s].contiguous() for s in range(L)]
        out = torch.zeros(n, L, d, device=val.device, dtype=torch.float32)
        for s in range(L):
            grid = (n, L - s, triton.cdiv(d, BLOCK_D))
            _decode_fwd[grid](
                idx_s[s], val_s[s], W_dec[s], out, K, L - s, d, L * d, s * d, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D
            )
        ctx.save_for_backward(*idx_s, *val_s, *W_dec)
        ctx.L = L
        return out.to(W_dec[0].dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        L = ctx.L
        saved = ctx.saved_tensors
        idx_s, val_s, W_dec = saved[:L], saved[L : 2 * L], saved[2 * L :]
        g = grad.contiguous()
        n, _, d = g.shape
        K = idx_s[0].shape[1]
        grad_val = (
            torch.empty(n, L, K, device=g.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        )
        grad_w: list[torch.Tensor | None] = []
        for s in range(L):
            R = (L - s) * d
            if ctx.needs_input_grad[2 + s]:  # ∂W and ∂val in one feature-major pass
                gw, gv = _grad_w_and_val(idx_s[s], val_s[s], W_dec[s], g, s, grad_val is not None)
                grad_w.append(gw.to(W_dec[s].dtype))
                if grad_val is not None and gv is not None:
                    grad_val[:, s] = gv
                continue
            grad_w.append(None)
            if grad_val is not None:
                gv = torch.empty(n, K, device=g.device, dtype=torch.float32)
                _decode_grad_val[(n, triton.cdiv(K, BLOCK_K))](
                    idx_s[s], gv, W_dec[s], g, K, R, L * d, s * d, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R
                )
                grad_val[:, s] = gv
        if grad_val is not None:
            grad_val = grad_val.to(saved[L].dtype)
        return (None, grad_val, *grad_w)


def _grad_w_and_val(idx, val, W, g, s: int, need_val: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Source layer s: idx, val: [n, K]; W: [F, L − s, d]; g: [n, L, d] -> (∂W [F, L − s, d] fp32,
    ∂val [n, K] fp32 or None). One program per (feature, block of its (L − s)·d row) reads that
    block of W once for all its slots (the token-major ∂val kernel read it once per slot)."""
    n, K = idx.shape
    L, d = g.shape[1], g.shape[2]
    F, R = W.shape[0], W[0].numel()
    nb = triton.cdiv(R, BLOCK_R)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # padding (−1) first, then by feature, token order kept
    gw = torch.empty_like(W, dtype=torch.float32)  # every row written once
    part = torch.zeros(flat.numel(), nb, device=g.device, dtype=torch.float32)  # [sorted slot, block]
    _decode_grad_fused[(F, nb)](
        feature_starts(flat, F), order, val, W, g, gw, part, K, R, nb, L * d, s * d, BLOCK_R=BLOCK_R
    )
    if not need_val:
        return gw, None
    gv = torch.empty(flat.numel(), device=g.device, dtype=torch.float32)
    gv[order] = part.sum(1)  # (padding slots: 0)
    return gw, gv.view(n, K)


def feature_starts(flat: torch.Tensor, F: int) -> torch.Tensor:
    """flat: [E] feature of each slot (−1: padding) -> [F + 1]: in the slots sorted by feature
    (padding first), feature f's run is [starts[f], starts[f + 1]). No host sync (no data-dependent
    shape: a scatter-add into F + 1 buckets, then a running sum)."""
    buckets = torch.zeros(F + 1, dtype=torch.int64, device=flat.device)
    return buckets.scatter_add_(0, flat + 1, torch.ones_like(flat)).cumsum(0)


def decode_triton(idx: torch.Tensor, val: torch.Tensor, W_dec: list[torch.Tensor]) -> torch.Tensor:
    return SparseDecode.apply(idx, val, *W_dec)
