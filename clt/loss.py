"""Loss terms of docs/DESIGN.md §1. Everything here is in normalised units and per-token means, so the
coefficients do not depend on the batch size.

    L = Σ_l SSE_l / Σ_l SST_l                                  (FVU-normalised MSE)
      + λ_S(t) · Σ_{l,i} tanh(c · a_{l,i} · ‖W_dec,i^l‖)        (jumprelu, relu)
      + λ_P · Σ_{l,i} ReLU(θ_{l,i} − h_{l,i}) · ‖W_dec,i^l‖    (jumprelu, relu with θ = 0)
      + α · AuxK                                               (topk, batchtopk)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .config import K_ACTIVATIONS


def reconstruction(
    y_hat: torch.Tensor, y: torch.Tensor, sst: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y_hat, y: [N, L, d] -> (loss, sse: [L], sst: [L]) with per-token means
    sse_l = E_n ‖ŷ_l − y_l‖², sst_l = E_n ‖y_l − E y_l‖² (batch estimate, no gradient; pass the
    global batch's under data parallelism)."""
    sse = squared_error(y_hat, y)
    if sst is None:
        sst = batch_sst(y.detach())
    sst = sst.detach()
    return sse.sum() / sst.sum().clamp_min(1e-12), sse, sst


class _SquaredError(torch.autograd.Function):
    """sse_l = E_n ‖ŷ_nl − y_nl‖²: one pass over [N, L, d] forward (the difference, then its norm
    per row), one backward (∂ŷ = (2/N) g_l (ŷ − y)), where autograd through sub/pow/sum/mean
    makes five."""

    @staticmethod
    def forward(ctx, y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        diff = y_hat - y
        ctx.save_for_backward(diff)
        return torch.linalg.vector_norm(diff, dim=-1).pow(2).mean(0)  # (einsum here: 7x slower on CPU)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (diff,) = ctx.saved_tensors
        grad = diff * (2 * g / diff.shape[0])[:, None]
        return grad, (-grad if ctx.needs_input_grad[1] else None)


def batch_sst(y: torch.Tensor) -> torch.Tensor:
    """y: [N, L, d] -> [L]: E_n ‖y_nl − E y_l‖² (two passes: no cancellation)."""
    return torch.linalg.vector_norm(y - y.mean(0), dim=-1).pow(2).mean(0)


def squared_error(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y_hat, y: [N, L, d] -> [L]: E_n ‖ŷ_l − y_l‖² (same dtype promotion as ŷ − y)."""
    return _SquaredError.apply(y_hat, y)


def tanh_sparsity(a: torch.Tensor, dec_norms: torch.Tensor, c: float) -> torch.Tensor:
    """a: [N, L, F], dec_norms: [L, F] -> E_n Σ_{l,i} tanh(c · a · ‖W_dec‖)."""
    return torch.tanh(c * a * dec_norms).sum((1, 2)).mean()


def preactivation(h: torch.Tensor, theta: torch.Tensor | float, dec_norms: torch.Tensor) -> torch.Tensor:
    """h: [N, L, F], θ: [L, F] or scalar -> E_n Σ_{l,i} ReLU(θ − h) · ‖W_dec‖ (pushes dead features
    towards their threshold)."""
    return ((theta - h).relu() * dec_norms).sum((1, 2)).mean()


def auxk_activations(h: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """h: [N, L, F], dead: [L, F] bool -> the top-k_aux pre-activations among dead features per
    (token, layer), ReLU'd: [N, L, F]."""
    k = min(k_aux, int(dead.sum(-1).max()))
    masked = h.masked_fill(~dead, torch.finfo(h.dtype).min)
    vals, idx = masked.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(h).scatter(-1, idx, vals.relu())


def auxk(e_hat: torch.Tensor, residual: torch.Tensor, sst: torch.Tensor) -> torch.Tensor:
    """AuxK: how well the dead features' decode ê predicts the residual e = y − ŷ (detached),
    normalised like the main loss. e_hat, residual: [N, L, d]; sst: [L]."""
    return squared_error(e_hat, residual).sum() / sst.sum().clamp_min(1e-12)


def ramp(step: int, total_steps: int, warmup_frac: float) -> float:
    """Linear ramp 0 → 1 over the first `warmup_frac` of training (λ_S schedule)."""
    if warmup_frac <= 0:
        return 1.0
    return min(1.0, step / max(1.0, warmup_frac * total_steps))


# ---------------------------------------------------------------------------------------------
# The whole loss of one batch


class LossTerms(NamedTuple):
    total: torch.Tensor  # what is back-propagated
    mse: torch.Tensor  # Σ_l SSE_l / Σ_l SST_l
    sparsity: torch.Tensor | None  # jumprelu, relu
    preact: torch.Tensor | None  # jumprelu, relu
    auxk: torch.Tensor | None  # topk, batchtopk (zero while no feature is dead)
    h: torch.Tensor  # [N, L, F] pre-activations
    a: Any  # [N, L, F] activations; TopK, JumpReLU: their entries (sparsity.TopKActivations,
    # sparsity.SparseActivations)
    sse: torch.Tensor  # [L] this process's batch
    sst: torch.Tensor  # [L] the global batch's


def clt_loss(
    clt, x: torch.Tensor, y: torch.Tensor, c, lambda_s: float, dead: torch.Tensor, mesh=None
) -> LossTerms:
    """The loss of the module docstring on one batch. x, y: [N, L, d] raw activations (CLT inputs,
    MLP outputs); c: the CLT config's coefficients (`CLTConfig`); lambda_s: λ_S at this step;
    dead: [L, F] bool, the features AuxK may use. `mesh`: the collectives of a data × feature
    sharded run (`clt.parallel.Parallel`: sums over feature shards, the global batch's SST, AuxK's
    selection across shards); None for one process. Pure: no counter or threshold is updated."""
    if mesh is None:
        from .parallel import Parallel

        mesh = Parallel()
    norms = clt.decoder_norms() if c.activation in ("jumprelu", "relu") else None
    fused = clt.jumprelu_terms(x, norms, c.sparsity_c) if c.activation == "jumprelu" else None
    sparsity: torch.Tensor | None = None
    preact: torch.Tensor | None = None
    if fused is not None:  # JumpReLU by its entries: a, S and P from one pass (kernels.jumprelu)
        h, a, sparsity, preact = fused
        y_hat = clt.decode_normalized(a)  # the entries are their own support
    else:
        h, a = clt.encode_activate(x, entries=True)  # [N, L, F] each (TopK: a by its entries)
        y_hat = clt.decode_normalized(a, support=clt.gradient_support(h, a))  # [N, L, d], normalised
        if norms is not None:
            sparsity = tanh_sparsity(a, norms, c.sparsity_c)
            preact = preactivation(h, clt.threshold if c.activation == "jumprelu" else 0.0, norms)
    y_n = y.to(y_hat.dtype) * clt.output_scale[:, None]
    mse, sse, sst = reconstruction(y_hat, y_n, sst=mesh.batch_sst(y_n.detach()))
    total, aux = mse, None
    if sparsity is not None and preact is not None:
        sparsity, preact = mesh.sum(sparsity), mesh.sum(preact)
        total = total + lambda_s * sparsity + c.preact_coeff * preact
    if c.activation in K_ACTIVATIONS:
        aux = torch.zeros((), device=x.device)
        if mesh.any(dead):
            e_hat = clt.decode_normalized(mesh.auxk_activations(h, dead, c.auxk_k), bias=False)
            aux = auxk(e_hat, (y_n - y_hat).detach(), sst)
            total = total + c.auxk_coeff * aux
    return LossTerms(total, mse, sparsity, preact, aux, h, a, sse, sst)
