"""Circuits read from weights alone: composition between heads, copying (OV eigenvalues) and the
token-space OV/QK circuits. Column convention, with W_QK = Wqᵀ Wk and W_OV = Wo Wv from
`clt.circuits.heads` (norm gains folded, σ ignored).

Composition of an earlier head a (layer < the receiver's) into a later head b:

    K(a→b) = ‖W_QK^b W_OV^a‖_F / (‖W_QK^b‖_F ‖W_OV^a‖_F)      a writes what b's keys read
    Q(a→b) = ‖W_QK^bᵀ W_OV^a‖_F / (‖W_QK^b‖_F ‖W_OV^a‖_F)     a writes what b's queries read
    V(a→b) = ‖W_OV^b W_OV^a‖_F / (‖W_OV^b‖_F ‖W_OV^a‖_F)      a writes what b's values read

Each lies in [0, 1]; for random factors it concentrates near 1/√d (`random_baseline`). Nothing d×d is
built: with thin QRs Wqᵀ = Q_q R_q and Wvᵀ = Q_v R_v (orthonormal Q), ‖W_QK^b W_OV^a‖ =
‖R_q^b Wk^b Wo^a R_v^aᵀ‖, a D×D product per pair (the same for Q and V with the roles swapped).
With RoPE, `offset=Δ` scores the query-key offset Δ: W_QK(Δ) = (R_Δ Wq)ᵀ Wk.

Copying: the nonzero eigenvalues of the token-space OV circuit W_U W_OV W_E (V×V) are those of the
D×D matrix (Wv W_E)(W_U Wo); the score Σ Re λ / Σ |λ| ∈ [−1, 1] is 1 for a head that copies its key
token to the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import CircuitError
from ..norms import final_norm
from .heads import Heads, LayerHeads, inv_sigma, norm_affine


def _stack(layers: Sequence[LayerHeads], fn) -> torch.Tensor:
    """[L, H, ...] of fn(layer_heads, h)."""
    return torch.stack([torch.stack([fn(lh, h) for h in range(lh.n_heads)]) for lh in layers])


def _r_factor(W: torch.Tensor) -> torch.Tensor:
    """W: [..., D, d] -> r [..., D, D] with Wᵀ = Q r (orthonormal Q), so that ‖Wᵀ X‖ = ‖r X‖ and
    ‖Y W‖ = ‖Y rᵀ‖ for any X, Y."""
    return torch.linalg.qr(W.transpose(-1, -2))[1]


@dataclass
class Composition:
    """Scores [L, H, L, H]: [a_layer, a_head, b_layer, b_head], zero unless a's layer < b's."""

    K: torch.Tensor
    Q: torch.Tensor
    V: torch.Tensor
    baseline: float  # the mean score of random factors of these shapes (≈ 1/√d)


def _pair_scores(left: torch.Tensor, right: torch.Tensor, layers: int) -> torch.Tensor:
    """left: [L, H, D, d] receiver factors (rows of R·Wk etc.), right: [L, H, d, D] sender factors;
    -> ‖left_b right_a‖_F / (‖left_b‖ ‖right_a‖) as [L, H, L, H] (a, b), zero unless layer a < b."""
    L, H = left.shape[:2]
    out = torch.zeros(L, H, L, H, dtype=left.dtype, device=left.device)
    nl = left.flatten(2).norm(dim=-1)  # [L, H]
    nr = right.flatten(2).norm(dim=-1)
    for b in range(1, layers):
        prod = torch.einsum("hDd,lgdE->lghDE", left[b], right[:b])  # [b, H_a, H_b, D, D]
        out[:b, :, b] = prod.flatten(3).norm(dim=-1) / (nr[:b, :, None] * nl[b][None, None])
    return out


@torch.no_grad()
def composition_scores(
    heads: Heads | Sequence[LayerHeads], offset: int = 0, dtype=torch.float32
) -> Composition:
    """Q-, K- and V-composition of every pair of heads (module docstring). `heads`: a model's
    `Heads`, or a list of `LayerHeads` (then offset must be 0)."""
    layers = heads.heads if isinstance(heads, Heads) else list(heads)
    Wq = _stack(layers, lambda lh, h: lh.Wq(h)).to(dtype)  # [L, H, D, d]
    Wk = _stack(layers, lambda lh, h: lh.Wk(h)).to(dtype)
    Wv = _stack(layers, lambda lh, h: lh.Wv(h)).to(dtype)
    Wo = _stack(layers, lambda lh, h: lh.Wo(h)).to(dtype)  # [L, H, d, D]
    if offset:
        if not isinstance(heads, Heads):
            raise CircuitError("a RoPE offset needs the model's rotations: pass its Heads")
        R = heads.rotations(offset + 1)
        if R is not None:
            Wq = R[offset].to(dtype) @ Wq
    Rq, Rk, Rv = _r_factor(Wq), _r_factor(Wk), _r_factor(Wv)
    sender = Wo @ Rv.transpose(-1, -2)  # ‖X W_OV‖ = ‖X Wo Rvᵀ‖: [L, H, d, D]
    # ‖Wqᵀ Wk Wo Wv‖ = ‖Rq Wk Wo Rvᵀ‖
    K = _pair_scores(Rq @ Wk, sender, len(layers))
    Q = _pair_scores(Rk @ Wq, sender, len(layers))
    # ‖Wo_b Wv_b Wo_a Wv_a‖ = ‖R_ob Wv_b Wo_a Rvᵀ‖ with Wo_b = Q R_ob
    Ro = torch.linalg.qr(Wo)[1]  # [L, H, D, D]
    V = _pair_scores(Ro @ Wv, sender, len(layers))
    base = random_baseline(Wq.shape[-1], Wq.shape[-2])
    return Composition(K=K.float(), Q=Q.float(), V=V.float(), baseline=base)


def composition_dense(W_receiver: torch.Tensor, W_OV_sender: torch.Tensor) -> float:
    """The definition, for tests and small models: ‖M W_OV‖ / (‖M‖ ‖W_OV‖) with M = W_QK, W_QKᵀ or
    the receiver's W_OV (all [d, d])."""
    return float((W_receiver @ W_OV_sender).norm() / (W_receiver.norm() * W_OV_sender.norm()))


def random_baseline(d: int, D: int, n: int = 20, seed: int = 0) -> float:
    """Mean K-composition score of n pairs of independent Gaussian heads of these shapes."""
    g = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(n):
        Wq, Wk, Wv = (torch.randn(D, d, generator=g) for _ in range(3))
        Wo = torch.randn(d, D, generator=g)
        left = _r_factor(Wq) @ Wk
        right = Wo @ _r_factor(Wv).T
        scores.append(float((left @ right).norm() / (left.norm() * right.norm())))
    return sum(scores) / n if scores else 1 / math.sqrt(d)


# ---------------------------------------------------------------------------------------------
# Token space: the embedding and unembedding as the heads see them


@torch.no_grad()
def embedding_matrix(heads: Heads, layer: int = 0, chunk: int = 8192) -> torch.Tensor:
    """W_E as layer `layer`'s heads read it: every token's embedding (as the model feeds it, e.g.
    with Gemma's √d scale) divided by its own σ under that layer's pre-attention norm: [V, d].
    (The direct path only: for layer > 0 the earlier layers' writes are not included.)"""
    model = heads.model
    lh = heads[layer]
    emb = model.get_input_embeddings()
    V = emb.weight.shape[0]
    dev = emb.weight.device
    rows = []
    for i in range(0, V, chunk):
        e = emb(torch.arange(i, min(V, i + chunk), device=dev)).float()
        rows.append(e * inv_sigma(e, lh.centred, lh.eps))
    return torch.cat(rows)


@torch.no_grad()
def unembedding_matrix(heads: Heads) -> torch.Tensor:
    """W_U with the final norm's gain (and centring) folded and its mean row removed (a logit added
    to every token changes nothing): [V, d]. The final σ is a prompt's and is left out."""
    model = heads.model
    W = model.get_output_embeddings().weight.detach().float()
    norm = final_norm(model)
    if norm is not None:
        gain, _, centred, _ = norm_affine(norm)
        W = W * gain
        W = W - W.mean(-1, keepdim=True) if centred else W
    return W - W.mean(0)


@torch.no_grad()
def ov_eigenvalues(
    W_V: torch.Tensor, W_O: torch.Tensor, W_E: torch.Tensor, W_U: torch.Tensor
) -> torch.Tensor:
    """Nonzero eigenvalues of W_U W_O W_V W_Eᵀ (V×V; W_E, W_U: [V, d]) via the D×D cyclic product
    (W_V W_Eᵀ)(W_U W_O): -> complex [D]."""
    return torch.linalg.eigvals((W_V @ W_E.T) @ (W_U @ W_O))


def positivity(eig: torch.Tensor) -> float:
    """Σ Re λ / Σ |λ| ∈ [−1, 1]."""
    return float(eig.real.sum() / eig.abs().sum().clamp_min(1e-30))


@torch.no_grad()
def copying_scores(heads: Heads, W_U: torch.Tensor | None = None) -> torch.Tensor:
    """Eigen-positivity of every head's token-space OV circuit (direct path: tokens embedded and
    normalised for the head's own layer, written straight to the logits): [L, H]."""
    W_U = unembedding_matrix(heads) if W_U is None else W_U
    out = torch.zeros(len(heads), heads.n_heads)
    for m, lh in enumerate(heads.heads):
        W_E = embedding_matrix(heads, m)
        for h in range(lh.n_heads):
            out[m, h] = positivity(ov_eigenvalues(lh.Wv(h), lh.Wo(h), W_E, W_U))
    return out


@torch.no_grad()
def ov_circuit(heads: Heads, layer: int, head: int, source_ids: torch.Tensor) -> torch.Tensor:
    """Columns of the full OV circuit W_U W_OV W_E: the logit change of every output token per unit
    of attention to each source token. source_ids [n] -> [n, V] (never V×V)."""
    lh = heads.head(layer, head)
    W_E = embedding_matrix(heads, layer)[source_ids]
    return (W_E @ lh.W_OV(head).T) @ unembedding_matrix(heads).T


@torch.no_grad()
def qk_circuit(heads: Heads, layer: int, head: int, query_ids: torch.Tensor, key_ids=None) -> torch.Tensor:
    """Rows of the full QK circuit W_Eᵀ W_QK W_E · scaling (same position, no bias): the score from
    each query token to each key token (default: every token). -> [n_q, n_k]."""
    lh = heads.head(layer, head)
    W_E = embedding_matrix(heads, layer)
    keys = W_E if key_ids is None else W_E[key_ids]
    return lh.scaling * (W_E[query_ids] @ lh.Wq(head).T) @ (keys @ lh.Wk(head).T).T
