"""Virtual weights between CLT features: the weight from feature (s, i) to feature (t, j) through the
residual stream, and through one attention head.

The CLT reads resid_mid (the residual entering the MLP block, before any norm): h_t = s_in[t] W_enc[t]
x_t + b, and its layer-l output is Σ_{s ≤ l} W_dec[s][:, l − s]ᵀ a_s / s_out[l]. Feature (s, i) adds
to resid_mid of layer t its writes at layers s..t−1 (the write at t lands after resid_mid_t):

    D^{(t)}_{s,i} = Σ_{l=s}^{t−1} W_dec[s][i, l − s] / s_out[l]                   [d]
    V[(s,i) → (t,j)] = s_in[t] · W_enc[t, j] · D^{(t)}_{s,i}                       (0 for t ≤ s)

With attention frozen at zero this is exactly what perturbing a_{s,i} at a position does to h_{t,j}
at the same position. One hop through head h of attention layer m (s < m ≤ t; s < m < t for a
parallel-residual model like GPT-NeoX, whose resid_mid_t does not contain layer t's attention),
from key position k to query position q:

    V^{h,m}[(s,i)@k → (t,j)@q] = A_h^m[q,k] / (σ_m[k] σ_post[q]) · s_in[t] W_enc[t,j] · Wo Wv D^{(m)}_{s,i}

where Wv carries layer m's pre-attention norm gain (and centring), Wo Gemma 2's post-attention norm
gain, and σ_m, σ_post are a prompt's frozen norm scales. `head_virtual_weights` gives the weight-only
part (A = σ = 1); a prompt's edge multiplies it by A[q, k] / (σ_m[k] σ_post[q]).
"""

from __future__ import annotations

import torch

from ..errors import CircuitError
from ..model import CrossLayerTranscoder
from .heads import Heads


def _check(clt: CrossLayerTranscoder, s: int, t: int) -> None:
    L = clt.n_layers
    if not (0 <= s < L and 0 <= t < L):
        raise CircuitError(f"layers ({s}, {t}): the CLT has layers 0..{L - 1}")
    if clt.arch.input_hook != "resid_mid":
        raise CircuitError(
            f"virtual weights need a CLT that reads resid_mid (before the norm); this one reads "
            f"{clt.arch.input_hook!r}"
        )


def _pick(w: torch.Tensor, idx) -> torch.Tensor:
    return w if idx is None else w[torch.as_tensor(idx, device=w.device)]


@torch.no_grad()
def feature_writes(clt: CrossLayerTranscoder, s: int, t: int, features=None) -> torch.Tensor:
    """D^{(t)}_s: what the features of layer s add to resid_mid of layer t > s. -> [n, d]."""
    _check(clt, s, t)
    if t <= s:
        return torch.zeros(len(_pick(clt.W_dec[s], features)), clt.arch.d_model, device=clt.W_enc.device)
    W = _pick(clt.W_dec[s], features)[:, : t - s].float()  # [n, t − s, d]: layers s..t−1
    return (W / clt.output_scale[s:t].float()[None, :, None]).sum(1)


@torch.no_grad()
def feature_reads(clt: CrossLayerTranscoder, t: int, features=None) -> torch.Tensor:
    """s_in[t] W_enc[t]: how the features of layer t read resid_mid_t. -> [n, d]."""
    return _pick(clt.W_enc[t], features).float() * clt.input_scale[t].float()


@torch.no_grad()
def virtual_weights(clt: CrossLayerTranscoder, s: int, t: int, sources=None, targets=None) -> torch.Tensor:
    """Residual-stream virtual weights V[(s, i) → (t, j)]: [n_sources, n_targets] (zero for t ≤ s)."""
    _check(clt, s, t)
    return feature_writes(clt, s, t, sources) @ feature_reads(clt, t, targets).T


@torch.no_grad()
def head_virtual_weights(
    clt: CrossLayerTranscoder, heads: Heads, s: int, t: int, m: int, h: int, sources=None, targets=None
) -> torch.Tensor:
    """Weight-only one-hop virtual weights through head h of attention layer m: [n_sources, n_targets]
    (module docstring; multiply by A[q, k] / (σ_m[k] σ_post[q]) for a prompt's edge)."""
    _check(clt, s, t)
    lh = heads.head(m, h)
    parallel = heads.family == "gpt_neox"
    if not (s < m <= t) or (parallel and m == t):
        rng = f"{s} < m < {t}" if parallel else f"{s} < m ≤ {t}"
        raise CircuitError(
            f"attention layer {m} is not between source layer {s} and target layer {t} (need {rng})"
        )
    D = feature_writes(clt, s, m, sources)  # [n_s, d]: the write arriving at layer m
    through = D @ (lh.Wo(h) @ lh.Wv(h)).T  # [n_s, d]: what the head writes per unit attention
    return through @ feature_reads(clt, t, targets).T
