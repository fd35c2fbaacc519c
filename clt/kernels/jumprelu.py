"""JumpReLU's training forward and backward from entries: the encoder, the activation, the tanh
sparsity and the pre-activation losses in one autograd function, with no dense [N, L, F] tensor
beyond h and with the encoder weight gradient from the entries.

Per layer l, token n, feature f (θ, ‖W_dec‖ = w: [L, F]; ε the bandwidth; x the scaled input):

    h = x W_encᵀ + b_enc                   a = h · 1[h > θ]
    S = E_n Σ_{l,f} tanh(c · a · w)        P = E_n Σ_{l,f} ReLU(θ − h) · w

The entries are the positions h > θ − ε/2: the active ones (h > θ), the band |h − θ| < ε/2 (whose
θ pseudo-gradient reads ∂L/∂a there), and h = θ. Everywhere else a = 0, ∂L/∂a is not needed, and
the only gradient h receives is the pre-activation loss's, −λ_P w / N at every token below θ: the
same for every token. So ∂L/∂h is a per-feature constant D = −λ_P w / N everywhere plus a sparse
correction on the entries, and the gradients need only the entries and two per-feature sums over
the tokens, R = Σ_n ReLU(θ − h) and C = #{n: h < θ}:

    ∂L/∂a_e   = (the decode's) + λ_S c w (1 − tanh²(c a w)) / N      (c w / N at a band entry, a = 0)
    ∂L/∂h_e   = ∂L/∂a_e · 1[h > θ] (+ ∂L/∂a_e (θ/ε) K with `ste_to_input`)
                + λ_P w / N · 1[h ≥ θ]      (− D: the constant's correction where h is not below θ)
    ∂L/∂W_enc = D ⊗ Σ_n x  +  Σ_e (∂L/∂h_e − D) x_e         (rank one + the entries)
    ∂L/∂b_enc = N D  +  Σ_e (∂L/∂h_e − D)
    ∂L/∂θ     = −Σ_e ∂L/∂a_e (θ/ε) K((h_e − θ)/ε)  +  λ_P w C / N
    ∂L/∂w     = Σ_e λ_S c a (1 − tanh²) / N  +  λ_P R / N

(K the rectangle kernel 1[|u| < 1/2]; λ_S, λ_P: the gradients arriving at S and P). These are the
dense path's gradients (`sparsity._JumpReLU`, `loss.tanh_sparsity`, `loss.preactivation`) exactly;
tests compare them. The scan and the weight gradient run in the C kernel (`kernels.cpu`) on CPU in
fp32; elsewhere the scan in torch and the weight gradient in Triton on CUDA
(`triton_encode.weight_grad_entries_triton`), else torch (sparse matmuls; no [E, d] tensor). On a
GPU with Triton JumpReLU takes the fused Triton encode by default (`clt.decode=auto`); this path
with `clt.decode=sparse`.
"""

from __future__ import annotations

import torch

from ..sparsity import SparseActivations
from . import cpu


def triton_available() -> bool:
    from . import triton_available as available

    return available()


def jumprelu_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    theta: torch.Tensor,
    dec_norms: torch.Tensor,
    bandwidth: float,
    ste_to_input: bool,
    c: float,
) -> tuple[torch.Tensor, SparseActivations, torch.Tensor, torch.Tensor]:
    """x: [N, L, d] (scaled), W_enc: [L, F, d], b_enc, θ, dec_norms: [L, F] -> (h: [N, L, F]
    (no gradient), a by its entries, S, P) as in the module docstring."""
    h, vals, sparsity, preact, rows, cols, layer, counts = _JumpReLUEncode.apply(
        x, W_enc, b_enc, theta, dec_norms, bandwidth, ste_to_input, c
    )
    a = SparseActivations(vals, rows, cols, layer, counts.tolist(), x.shape[0], W_enc.shape[1])
    return h, a, sparsity, preact


def scan(h: torch.Tensor, theta: torch.Tensor, lo: torch.Tensor):
    """h: [N, L, F], θ, lo = θ − ε/2: [L, F] -> (rows, cols, hv, counts, R, C): the entries h > lo
    layer by layer in (token, feature) order, h at them, entries per layer [L], and R, C: [L, F]."""
    if cpu.usable(h, theta, lo):
        return cpu.jumprelu_scan(h, theta, lo)
    layer, rows, cols = (h > lo).transpose(0, 1).nonzero(as_tuple=True)
    hv = h[rows, layer, cols]
    counts = torch.bincount(layer, minlength=h.shape[1])
    R = (theta - h).clamp_min(0).sum(0)
    C = (h < theta).sum(0).to(h.dtype)
    return rows, cols, hv, counts, R, C


def weight_grad(x, counts, rows, cols, g, D) -> torch.Tensor:
    """x: [N, L, d]; the entries' ∂h (g: [E], layer by layer) and the constant D: [L, F] ->
    ∂W_enc = D ⊗ Σ_n x + Σ_e g_e x_e: [L, F, d]."""
    xsum = x.sum(0)
    if cpu.usable(x, g, D):
        return cpu.encoder_weight_grad_entries(x, counts.cpu(), rows, cols, g, D, xsum)
    n, L, d = x.shape
    if x.is_cuda and triton_available():
        from .triton_encode import weight_grad_entries_triton

        layer = torch.repeat_interleave(torch.arange(L, device=x.device), counts)
        return weight_grad_entries_triton(x, rows, layer, cols, g, D.shape[1], const=D)
    gW = D[:, :, None] * xsum[:, None, :]
    for lay, (r, f, gv) in enumerate(zip(*(t.split(counts.tolist()) for t in (rows, cols, g)))):
        if r.numel():
            S = torch.sparse_coo_tensor(torch.stack([f, r]), gv, (D.shape[1], n))
            gW[lay] += torch.sparse.mm(S, x[:, lay])
    return gW


class _JumpReLUEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, theta, dec_norms, bandwidth: float, ste_to_input: bool, c: float):
        if torch.is_autocast_enabled(x.device.type):  # bf16 GEMM, the bias added in fp32
            h = torch.einsum("nld,lfd->nlf", x, W_enc) + b_enc
        else:  # one batched GEMM with the bias, layer-major: [L, N, F] (what the scan reads)
            h = torch.baddbmm(b_enc[:, None], x.transpose(0, 1), W_enc.transpose(1, 2)).transpose(0, 1)
        n, L, F = h.shape
        ctx.set_materialize_grads(False)  # (h has no gradient: no [N, L, F] of zeros for it)
        hf, theta, w = h.detach().float(), theta.detach().float(), dec_norms.detach().float()
        rows, cols, hv, counts, R, C = scan(hf, theta, theta - bandwidth / 2)
        counts = counts.to(h.device)
        layer = torch.repeat_interleave(torch.arange(L, device=h.device), counts)
        key = layer * F + cols
        th_e, w_e = theta.reshape(-1)[key], w.reshape(-1)[key]
        vals = torch.where(hv > th_e, hv, torch.zeros_like(hv))
        t = torch.tanh(c * vals * w_e)  # 0 off the active entries
        sparsity = t.sum() / n
        preact = (R * w).sum() / n
        ctx.save_for_backward(x, W_enc, rows, cols, hv, counts, key, th_e, w_e, t, R, C, w)
        ctx.cfg = (n, L, F, bandwidth, ste_to_input, c, theta.dtype, dec_norms.dtype, b_enc.dtype)
        ctx.mark_non_differentiable(h, rows, cols, layer, counts)
        return h, vals.to(h.dtype), sparsity, preact, rows, cols, layer, counts

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _gh, g_vals, g_s, g_p, *_):
        x, W_enc, rows, cols, hv, counts, key, th_e, w_e, t, R, C, w = ctx.saved_tensors
        n, L, F, eps, ste, c, th_dtype, w_dtype, b_dtype = ctx.cfg
        g_a = torch.zeros_like(hv) if g_vals is None else g_vals.float()
        g_s = torch.zeros((), device=hv.device) if g_s is None else g_s.float()
        g_p = torch.zeros((), device=hv.device) if g_p is None else g_p.float()
        active = hv > th_e
        kernel = ((hv - th_e).abs() < eps / 2).to(hv.dtype) * (th_e / eps)  # (θ/ε)·K((h−θ)/ε)
        sech2 = 1 - t * t
        g_a = g_a + (g_s / n) * c * w_e * sech2  # ∂L/∂a: the decode's and S's (c·w at a = 0)
        g = torch.where(active, g_a, torch.zeros_like(hv))
        if ste:
            g = g + g_a * kernel
        g = g + (hv >= th_e).to(hv.dtype) * ((g_p / n) * w_e)  # the constant's correction
        D = -(g_p / n) * w  # [L, F]: ∂L/∂h at every position off the entries
        flat = torch.zeros(L * F, device=hv.device)
        g_theta = flat.index_add(0, key, -g_a * kernel).view(L, F) + (g_p / n) * w * C
        vals = torch.where(active, hv, torch.zeros_like(hv))
        g_w = flat.index_add(0, key, (g_s / n) * c * vals * sech2).view(L, F) + (g_p / n) * R
        g_b = flat.index_add(0, key, g).view(L, F) + n * D
        need = ctx.needs_input_grad
        g_W = weight_grad(x.float(), counts, rows, cols, g, D).to(W_enc.dtype) if need[1] else None
        g_x = None
        if need[0]:
            Wf = W_enc.float()
            g_x = torch.einsum("lf,lfd->ld", D, Wf).expand(n, L, -1).clone().view(n * L, -1)
            layer = torch.div(key, F, rounding_mode="floor")
            g_x.index_add_(0, rows * L + layer, g[:, None] * Wf.reshape(L * F, -1)[key])
            g_x = g_x.view(n, L, -1).to(x.dtype)
        return g_x, g_W, g_b.to(b_dtype), g_theta.to(th_dtype), g_w.to(w_dtype), None, None, None
