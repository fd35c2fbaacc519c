"""The CLT's sparse activation functions. Each maps pre-activations h: [N, L, F] to activations a
of the same shape (zeros where inactive).

- topk:      keep the k largest h per token and layer (ReLU'd).
- batchtopk: keep the k·N largest h per layer over the batch; at inference a JumpReLU with one
             threshold per layer (running estimate of the smallest kept value).
- cross-layer scope (`topk_scope="all"`, both): the budget is k·L per token (TopK) or k·L·N per
             batch (BatchTopK) over the features of all layers together, so a token spends it
             where its MLPs need it; at inference both are a JumpReLU with one threshold per layer
             (a layer's features cannot wait for the later layers' inputs), estimated in training
             as the value above which the batch holds as many of that layer's h as were kept.
- jumprelu:  a = h · H(h − θ), θ per feature; rectangle-kernel pseudo-gradients (docs/DESIGN.md §1).
- relu:      plain ReLU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def topk_entries(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h: [..., F] -> (vals, idx): [..., k], the k largest entries of the last axis, ReLU'd."""
    vals, idx = h.topk(k, dim=-1, sorted=False)
    return vals.relu(), idx


class TopKActivations(NamedTuple):
    """TopK's activations by their entries, the dense [N, L, F] never built:
    a[n, l, idx[n, l, j]] = vals[n, l, j] ≥ 0 (0 where the j-th largest h was negative).
    vals (differentiable), idx: [N, L, k]; d_sae: F."""

    vals: torch.Tensor
    idx: torch.Tensor
    d_sae: int

    @classmethod
    def of(cls, h: torch.Tensor, k: int) -> TopKActivations:
        """h: [N, L, F] -> the k largest entries per (token, layer), ReLU'd."""
        vals, idx = topk_entries(h, k)
        return cls(vals, idx, h.shape[-1])

    def dense(self) -> torch.Tensor:
        """[N, L, F], equal to `topk(h, k)`."""
        n, layers, _ = self.vals.shape
        return self.vals.new_zeros(n, layers, self.d_sae).scatter(-1, self.idx, self.vals)

    def fired(self) -> torch.Tensor:
        """[L, F] bool: active at some token of the batch."""
        layers = self.vals.shape[1]
        on = (self.vals.detach() > 0).transpose(0, 1).reshape(layers, -1).to(torch.int32)  # [L, N·k]
        count = torch.zeros(layers, self.d_sae, dtype=torch.int32, device=self.vals.device)
        return count.scatter_add_(-1, self.idx.transpose(0, 1).reshape(layers, -1), on) > 0

    def l0(self) -> torch.Tensor:
        """[L] mean number of active features per token."""
        return (self.vals.detach() > 0).sum(-1).float().mean(0)


class SparseActivations(NamedTuple):
    """Activations by their entries, a ragged count per (token, layer) (JumpReLU's training path:
    the dense [N, L, F] a is never built). Entries run layer by layer, each layer's in (token,
    feature) order: a[rows[e], layer[e], cols[e]] = vals[e] ≥ 0. An entry may hold 0 (JumpReLU's
    band: below θ, its ∂a still needed); every position that is not an entry is 0 and needs no ∂a.
    vals (differentiable), rows, cols, layer: [E]; counts: [L] entries per layer; n: N; d_sae: F."""

    vals: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    layer: torch.Tensor
    counts: list[int]
    n: int
    d_sae: int

    def per_layer(self) -> tuple[tuple, tuple, tuple]:
        """(rows, cols, vals), each split by source layer (views)."""
        return self.rows.split(self.counts), self.cols.split(self.counts), self.vals.split(self.counts)

    def dense(self) -> torch.Tensor:
        """[N, L, F] (differentiable in vals)."""
        shape = (self.n, len(self.counts), self.d_sae)
        return self.vals.new_zeros(shape).index_put((self.rows, self.layer, self.cols), self.vals)

    def support(self) -> torch.Tensor:
        """[N, L, F] bool: the entries' positions (where ∂L/∂a is needed)."""
        shape = (self.n, len(self.counts), self.d_sae)
        on = torch.ones_like(self.rows, dtype=torch.bool)
        return torch.zeros(shape, dtype=torch.bool, device=self.vals.device).index_put(
            (self.rows, self.layer, self.cols), on
        )

    def fired(self) -> torch.Tensor:
        """[L, F] bool: active at some token of the batch."""
        L, F = len(self.counts), self.d_sae
        on = (self.vals.detach() > 0).to(torch.int32)
        count = torch.zeros(L * F, dtype=torch.int32, device=self.vals.device)
        return (count.index_add_(0, self.layer * F + self.cols, on) > 0).view(L, F)

    def l0(self) -> torch.Tensor:
        """[L] mean number of active features per token."""
        on = (self.vals.detach() > 0).float()
        return torch.zeros(len(self.counts), device=on.device).index_add_(0, self.layer, on) / self.n


def topk(h: torch.Tensor, k: int) -> torch.Tensor:
    """h: [N, L, F] -> a: [N, L, F] with the k largest entries per (token, layer) kept, ReLU'd."""
    vals, idx = topk_entries(h, k)
    return torch.zeros_like(h).scatter(-1, idx, vals)


def batchtopk(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h: [N, L, F] -> (a: [N, L, F], min_kept: [L]). Per layer keeps the k·N largest entries over
    the whole batch (ragged per token), ReLU'd; min_kept is the smallest kept positive value per
    layer (for the inference threshold)."""
    n, layers, f = h.shape
    flat = h.transpose(0, 1).reshape(layers, n * f)  # [L, N·F]
    vals, idx = flat.topk(k * n, dim=-1, sorted=False)
    vals = vals.relu()
    a = torch.zeros_like(flat).scatter(-1, idx, vals).reshape(layers, n, f).transpose(0, 1)
    pos = torch.where(vals > 0, vals.detach(), torch.full_like(vals, float("inf")))
    min_kept = pos.min(dim=-1).values
    return a, torch.where(torch.isinf(min_kept), torch.zeros_like(min_kept), min_kept)


def _layer_thresholds(h: torch.Tensor, kept_per_layer: torch.Tensor) -> torch.Tensor:
    """h: [N, L, F], kept_per_layer: [L] counts m_l -> [L]: per layer the midpoint of the m_l-th
    and (m_l+1)-th largest h over the batch, so that h > θ_l keeps m_l entries of this batch (NaN
    where a layer kept none)."""
    n, layers, f = h.shape
    out = torch.full((layers,), float("nan"), device=h.device)
    flat = h.detach().transpose(0, 1).reshape(layers, n * f).float()
    for layer, m in enumerate(kept_per_layer.tolist()):
        if m > 0:
            v = flat[layer].topk(min(m + 1, n * f)).values
            out[layer] = (v[m - 1] + v[m]) / 2 if m < n * f else v[m - 1] / 2
    return out.clamp_min(0)  # the kept are positive: 0 keeps them all when the next is ≤ 0


def topk_all(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-layer TopK. h: [N, L, F] -> (a: [N, L, F], thresholds: [L]). Per token keeps the k·L
    largest entries over all layers' features together (ragged per layer), ReLU'd; thresholds: the
    per-layer inference threshold this batch suggests (`_layer_thresholds`)."""
    n, layers, f = h.shape
    flat = h.reshape(n, layers * f)
    vals, idx = flat.topk(min(k * layers, layers * f), dim=-1, sorted=False)
    vals = vals.relu()
    a = torch.zeros_like(flat).scatter(-1, idx, vals).view(n, layers, f)
    on = vals.detach() > 0
    kept = torch.bincount((idx // f)[on], minlength=layers)
    return a, _layer_thresholds(h, kept)


def batchtopk_all(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-layer BatchTopK. h: [N, L, F] -> (a: [N, L, F], min_kept: [L]). Keeps the k·L·N
    largest entries of the whole batch over all layers (ragged per token and layer), ReLU'd;
    min_kept: the smallest kept positive value per layer (NaN where a layer kept none)."""
    n, layers, f = h.shape
    flat = h.reshape(-1)  # token-major: index = (n·L + l)·F + i
    vals, idx = flat.topk(min(k * layers * n, flat.numel()), sorted=False)
    vals = vals.relu()
    a = torch.zeros_like(flat).scatter(-1, idx, vals).view(n, layers, f)
    layer = (idx // f) % layers
    pos = torch.where(vals > 0, vals.detach(), torch.full_like(vals, float("inf")))
    min_kept = torch.full((layers,), float("inf"), device=h.device, dtype=pos.dtype)
    min_kept = min_kept.scatter_reduce(0, layer, pos, reduce="amin")
    return a, torch.where(torch.isinf(min_kept), torch.full_like(min_kept, float("nan")), min_kept)


def threshold_relu(h: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Inference form of BatchTopK: a = h · 1[h > threshold[l]], threshold: [L]."""
    return h * (h > threshold[:, None]).to(h.dtype)


class _JumpReLU(torch.autograd.Function):
    """a = h · H(h − θ).

    Pseudo-gradients with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth ε:
        ∂a/∂θ = −(θ/ε) · K((h − θ)/ε)
        ∂a/∂h = H(h − θ)                         (+ (θ/ε)·K((h−θ)/ε) with ste_to_input)
    """

    @staticmethod
    def forward(ctx, h, theta, bandwidth: float, ste_to_input: bool):
        ctx.save_for_backward(h, theta)
        ctx.bandwidth, ctx.ste_to_input = bandwidth, ste_to_input
        return h * (h > theta).to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_band = ((h - theta).abs() < eps / 2).to(grad.dtype)
        kernel = (theta / eps).to(grad.dtype) * in_band  # (θ/ε)·K((h−θ)/ε)
        grad_h = grad * (h > theta).to(grad.dtype)
        if ctx.ste_to_input:
            grad_h = grad_h + grad * kernel
        grad_theta = -(grad * kernel)
        # θ broadcasts over the leading (token) dimensions: sum them out
        while grad_theta.dim() > theta.dim():
            grad_theta = grad_theta.sum(0)
        return grad_h, grad_theta.to(theta.dtype), None, None


def jumprelu(
    h: torch.Tensor, theta: torch.Tensor, bandwidth: float = 1.0, ste_to_input: bool = False
) -> torch.Tensor:
    """h: [..., L, F], theta: [L, F] (fp32) -> a: same shape as h."""
    return _JumpReLU.apply(h, theta, bandwidth, ste_to_input)
