"""The parts of a feature card that need no data: logit effects, decoder norms per target layer and
virtual-weight neighbours (docs/DESIGN.md §8). Everything is in the subject model's units (the CLT's
normalisation folded into its weights).

    v_f       = Σ_{t ≥ s} W_dec[s→t][f]                     what feature (s, f) adds to the residual stream
    logits_f  = W_U · (γ ⊙ c(v_f))                          its direct effect on the logits through the
                                                            final norm (gain γ; c centres for LayerNorm)
    V[(s,f) → (t,g)] = W_enc[t][g] · Σ_{s ≤ l < t} W_dec[s→l][f]   virtual weight: what (s, f) adds to
                                                            (t, g)'s pre-activation through the residual
                                                            stream (t > s; the input hook is resid_mid)
"""

from __future__ import annotations

from typing import Any

import torch

from .. import norms
from ..errors import FeatureError
from ..model import CrossLayerTranscoder


def final_norm(model: Any) -> tuple[torch.Tensor, bool]:
    """(γ̃ [d] float32, centres) of the final norm before the unembedding (clt.norms: its gain's
    form, w or Gemma's 1 + w, found by probing the module)."""
    m = norms.final_norm(model)
    if m is None:
        raise FeatureError(f"{type(model).__name__} has no final norm to fold into the logit effects")
    gamma, _, centred, _ = norms.norm_affine(m, FeatureError)
    return gamma.cpu(), centred


def residual_writes(
    clt: CrossLayerTranscoder, layer: int, features: torch.Tensor | None = None
) -> torch.Tensor:
    """v_f = Σ_t W_dec[layer→t][f] for the features of `layer` (default all): [n, d]. `clt` folded."""
    w = clt.W_dec[layer] if features is None else clt.W_dec[layer][features]
    return w.float().sum(1)


@torch.no_grad()
def logit_effects(
    clt: CrossLayerTranscoder,
    W_U: torch.Tensor,
    gamma: torch.Tensor,
    centre: bool,
    layer: int,
    features: torch.Tensor | None = None,
    n: int = 10,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top and bottom `n` logit effects of the features of `layer`: (top values, top ids, bottom
    values, bottom ids), each [n_features, n]. `clt` folded; W_U: [V, d]."""
    W_U, gamma = W_U.float(), gamma.float().to(W_U.device)
    out = []
    ids = torch.arange(clt.d_sae) if features is None else features
    if len(ids) == 0:
        return (torch.zeros(0, n), torch.zeros(0, n, dtype=torch.long)) * 2
    for s in range(0, len(ids), chunk):
        v = residual_writes(clt, layer, ids[s : s + chunk]).to(W_U.device)
        if centre:
            v = v - v.mean(-1, keepdim=True)
        logits = (v * gamma) @ W_U.T  # [c, V]
        top, bot = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        out.append((top.values, top.indices, bot.values, bot.indices))
    return tuple(torch.cat([o[i] for o in out]).cpu() for i in range(4))  # type: ignore[return-value]


@torch.no_grad()
def decoder_norms(
    clt: CrossLayerTranscoder, layer: int, features: torch.Tensor | None = None
) -> torch.Tensor:
    """‖W_dec[layer→t][f]‖ for every target layer t ≥ layer: [n_features, L − layer]. `clt` folded."""
    w = clt.W_dec[layer] if features is None else clt.W_dec[layer][features]
    return w.float().norm(dim=-1)


@torch.no_grad()
def virtual_weight_neighbours(
    clt: CrossLayerTranscoder,
    n: int = 10,
    features: list[torch.Tensor | None] | None = None,
    chunk: int = 4096,
) -> tuple[list, list]:
    """The `n` strongest (by |weight|) downstream and upstream neighbours of the selected features,
    by virtual weight, among all features. `features[l]`: indices of layer l (None = all). Returns
    (down, up), each a list over layers of (weights, layers, indices), each [n_l, n] (layer −1:
    an empty slot, when fewer than n features are connected). `clt`
    folded. Cost: Σ_{s<t} F·F·d multiply-adds (every pair of layers once) for all features."""
    L, F = clt.n_layers, clt.d_sae
    dev = clt.W_enc.device
    full = [f is None for f in (features or [None] * L)]
    ids = [torch.arange(F, device=dev) if f is None else f.to(dev) for f in (features or [None] * L)]
    down = [_no_neighbours(len(i), n, dev) for i in ids]
    up = [_no_neighbours(len(i), n, dev) for i in ids]
    everyone = torch.arange(F, device=dev)
    for s in range(L - 1):
        cum = torch.zeros(F, clt.arch.d_model, device=dev)
        for t in range(s + 1, L):
            cum += clt.W_dec[s][:, t - 1 - s].float()  # Σ_{s ≤ l < t} W_dec[s→l][f]
            enc = clt.W_enc[t].float()
            for c in range(0, len(ids[s]), chunk):
                rows = slice(c, c + chunk)
                V = cum[ids[s][rows]] @ enc.T  # [c, F]: (s, f) → (t, g)
                for b, m in zip(down[s], _keep([b[rows] for b in down[s]], V, t, everyone, n)):
                    b[rows] = m
                if full[s] and full[t]:  # upstream from the same product
                    up[t] = _keep(up[t], V.T, s, ids[s][rows], n)
            if not (full[s] and full[t]) and len(ids[t]):
                up[t] = _keep(up[t], enc[ids[t]] @ cum.T, s, everyone, n)  # [n_t, F]: (s, f) → (t, g)
    return down, up


def _no_neighbours(m: int, n: int, dev) -> list[torch.Tensor]:
    """n empty neighbour slots per row: weight 0, layer −1 (dropped when read)."""
    return [
        torch.zeros(m, n, device=dev),
        torch.full((m, n), -1, dtype=torch.long, device=dev),
        torch.full((m, n), -1, dtype=torch.long, device=dev),
    ]


def _keep(best: list, w: torch.Tensor, layer: int, idx: torch.Tensor, n: int) -> list:
    """Merge candidates w [m, c] (of layer `layer`, indices idx [c]) into best = (weights, layers,
    indices) [m, n]: the n largest |weight| (ties: the earlier candidate)."""
    W = torch.cat([best[0], w], 1)
    Ly = torch.cat([best[1], torch.full_like(w, layer, dtype=torch.long)], 1)
    Ix = torch.cat([best[2], idx[None].expand(len(w), -1)], 1)
    top = torch.sort(W.abs(), dim=1, descending=True, stable=True).indices[:, :n]
    return [W.gather(1, top), Ly.gather(1, top), Ix.gather(1, top)]
