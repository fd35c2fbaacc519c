"""Per-head attention weights of a Hugging Face LM, with the pre-attention norm folded in.

Column-vector convention (as `nn.Linear`). For head h of layer m, with H query heads, H_kv key/value
heads and group g(h) = h // (H / H_kv):

    x̂_p  = γ ⊙ N r_p / σ_p + β                  r_p = resid_pre[p], the input of the pre-attention norm
                                                 (N = I − 11ᵀ/d for LayerNorm, I for RMSNorm)
    q_h(p) = R_p [(W_Q^h r_p / σ_p + b_Q^h) ⊙ γ_q / σ_q]        (the bracket's γ_q/σ_q: Qwen 3's q_norm)
    k_g(j) = R_j [(W_K^g r_j / σ_j + b_K^g) ⊙ γ_k / σ_k]
    S[p, j] = scaling · q_h(p) · k_g(j)        pre-softmax score (Gemma 2: c·tanh(S/c), then the mask)
    out(p)  = Γ (Σ_h W_O^h Σ_j A_h[p, j] (W_V^g r_j / σ_j + b_V^g) + b_O)    (Γ: Gemma 2's post-norm)

where the stored W_Q = W_Q^raw diag(γ) N and b_Q = b_Q^raw + W_Q^raw β (the same for K and V): the
norm's gain and centring are folded, its per-position 1/σ is not (a prompt's scalar). R_p ∈ R^{D×D}
is the rotary embedding at position p, built by applying the model's own rotary code to the
identity (every RoPE variant the model implements, partial rotary included), I without RoPE.

The weight-only analyses (`clt.circuits.weights`) use `W_QK(h) = Wq(h)ᵀ Wk(h)` and
`W_OV(h) = Wo(h) Wv(h)` with the q/k-norm and post-norm gains folded and every σ ignored.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import norms
from ..errors import CircuitError
from ..norms import inv_sigma
from ..subject import FAMILIES, _getattr_path


def norm_affine(module: Any) -> tuple[torch.Tensor, torch.Tensor | None, bool, float]:
    """clt.norms.norm_affine (gain, bias, centred, eps) with a CircuitError for a norm it cannot fold."""
    return norms.norm_affine(module, CircuitError)


@dataclass
class LayerHeads:
    """The heads of one attention layer (fp32), pre-attention norm folded (module docstring)."""

    layer: int
    W_Q: torch.Tensor  # [H, D, d]
    b_Q: torch.Tensor  # [H, D]
    W_K: torch.Tensor  # [H_kv, D, d]
    b_K: torch.Tensor  # [H_kv, D]
    W_V: torch.Tensor  # [H_kv, D, d]
    b_V: torch.Tensor  # [H_kv, D]
    W_O: torch.Tensor  # [H, d, D]
    b_O: torch.Tensor  # [d]
    scaling: float
    softcap: float | None  # Gemma 2's attention-logit soft cap
    sliding_window: int | None  # key j is seen from query p iff p − window < j ≤ p
    centred: bool  # the pre-attention norm is a LayerNorm
    eps: float  # its epsilon
    q_gain: torch.Tensor | None = None  # [D] Qwen 3's q_norm gain (with its own σ, before RoPE)
    k_gain: torch.Tensor | None = None  # [D]
    qk_eps: float = 1e-6
    post_gain: torch.Tensor | None = None  # [d] Gemma 2's post-attention norm gain (with its σ)
    post_eps: float = 1e-6

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_kv(self) -> int:
        return self.W_K.shape[0]

    @property
    def head_dim(self) -> int:
        return self.W_Q.shape[1]

    def group(self, h: int) -> int:
        return h // (self.n_heads // self.n_kv)

    def check_head(self, h: int) -> int:
        if not 0 <= h < self.n_heads:
            raise CircuitError(f"head {h} of layer {self.layer}: the layer has heads 0..{self.n_heads - 1}")
        return h

    # -- folded weights for weight-only analysis ([D, d] / [d, D], every σ ignored) -------------
    def Wq(self, h: int) -> torch.Tensor:
        w = self.W_Q[self.check_head(h)]
        return w if self.q_gain is None else self.q_gain[:, None] * w

    def Wk(self, h: int) -> torch.Tensor:
        w = self.W_K[self.group(self.check_head(h))]
        return w if self.k_gain is None else self.k_gain[:, None] * w

    def Wv(self, h: int) -> torch.Tensor:
        return self.W_V[self.group(self.check_head(h))]

    def Wo(self, h: int) -> torch.Tensor:
        w = self.W_O[self.check_head(h)]
        return w if self.post_gain is None else self.post_gain[:, None] * w

    def W_QK(self, h: int) -> torch.Tensor:
        """[d, d]: score ≈ x̂_pᵀ W_QK x̂_j · scaling (no RoPE, biases or σ)."""
        return self.Wq(h).T @ self.Wk(h)

    def W_OV(self, h: int) -> torch.Tensor:
        """[d, d]: the head's write per unit of attention to a key with residual x."""
        return self.Wo(h) @ self.Wv(h)

    # -- exact scores and patterns from the residual stream --------------------------------------
    def _heads_side(self, r, W, b, gain, R, s=None):
        """r: [T, d] -> rotated [n, T, D] (queries or keys). s: the norm's 1/σ [T, 1] (default:
        computed from r, which is what the model does)."""
        s = inv_sigma(r, self.centred, self.eps) if s is None else s
        x = torch.einsum("ned,td->nte", W, r * s) + b[:, None]
        if gain is not None:  # Qwen 3: RMSNorm over the head dim, before the rotation
            x = x * gain * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.qk_eps)
        return x if R is None else torch.einsum("tij,ntj->nti", R, x)

    def queries(self, r: torch.Tensor, R: torch.Tensor | None, s=None) -> torch.Tensor:
        """resid_pre r: [T, d], rotations R: [T, D, D] or None -> q: [H, T, D]."""
        return self._heads_side(r, self.W_Q, self.b_Q, self.q_gain, R, s)

    def keys(self, r: torch.Tensor, R: torch.Tensor | None, s=None) -> torch.Tensor:
        """-> k: [H_kv, T, D]."""
        return self._heads_side(r, self.W_K, self.b_K, self.k_gain, R, s)

    def scores(self, r: torch.Tensor, R: torch.Tensor | None, s=None) -> torch.Tensor:
        """[T, d] -> pre-softmax, pre-softcap scores S: [H, T, T] (query, key)."""
        q, k = self.queries(r, R, s), self.keys(r, R, s)
        k = k.repeat_interleave(self.n_heads // self.n_kv, 0)
        return self.scaling * q @ k.transpose(1, 2)

    def mask(self, T: int, device=None) -> torch.Tensor:
        """[T, T] bool: key j visible from query p."""
        p = torch.arange(T, device=device)[:, None]
        j = torch.arange(T, device=device)[None]
        m = j <= p
        return m & (j > p - self.sliding_window) if self.sliding_window else m

    def pattern(self, r: torch.Tensor, R: torch.Tensor | None, s=None) -> torch.Tensor:
        """[T, d] -> attention pattern A: [H, T, T]."""
        S = self.scores(r, R, s)
        if self.softcap:
            S = self.softcap * torch.tanh(S / self.softcap)
        return torch.softmax(S.masked_fill(~self.mask(S.shape[-1], S.device), float("-inf")), -1)


def _raw_weights(family: str, attn: Any, d: int, H: int, H_kv: int, D: int):
    """The attention module's projections as (W_Q [H, D, d], b_Q, W_K [H_kv, D, d], b_K, W_V, b_V,
    W_O [H, d, D], b_O [d]); a missing bias is None."""

    def bias(lin, n):
        b = getattr(lin, "bias", None)
        return None if b is None else b.detach().float().view(n, D)

    if family == "gpt2":  # Conv1D: y = x W + b, W [d, 3d]; q, k, v in column blocks of d
        W = attn.c_attn.weight.detach().float()
        b = attn.c_attn.bias.detach().float()
        WQ, WK, WV = (W[:, i * d : (i + 1) * d].T.reshape(H, D, d) for i in range(3))
        bQ, bK, bV = (b[i * d : (i + 1) * d].reshape(H, D) for i in range(3))
        WO = attn.c_proj.weight.detach().float().T.reshape(d, H, D).permute(1, 0, 2)
        return WQ, bQ, WK, bK, WV, bV, WO, attn.c_proj.bias.detach().float()
    if family == "gpt_neox":  # fused [3d, d], viewed [H, 3D]: (q | k | v) per head
        W = attn.query_key_value.weight.detach().float().view(H, 3 * D, d)
        b = attn.query_key_value.bias
        b = None if b is None else b.detach().float().view(H, 3 * D)
        parts = [W[:, i * D : (i + 1) * D] for i in range(3)]
        bparts = [None if b is None else b[:, i * D : (i + 1) * D] for i in range(3)]
        WO = attn.dense.weight.detach().float().reshape(d, H, D).permute(1, 0, 2)
        bO = attn.dense.bias
        return (
            parts[0], bparts[0], parts[1], bparts[1], parts[2], bparts[2], WO,
            None if bO is None else bO.detach().float(),
        )  # fmt: skip
    try:  # Llama layout: q/k/v/o_proj Linear layers, head h = rows hD:(h+1)D
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    except AttributeError as e:
        raise CircuitError(
            f"cannot read the attention weights of {type(attn).__name__}: no q_proj/k_proj/v_proj/o_proj"
        ) from e
    WO = o.weight.detach().float().reshape(d, H, D).permute(1, 0, 2)
    bO = getattr(o, "bias", None)
    return (
        q.weight.detach().float().view(H, D, d), bias(q, H),
        k.weight.detach().float().view(H_kv, D, d), bias(k, H_kv),
        v.weight.detach().float().view(H_kv, D, d), bias(v, H_kv),
        WO, None if bO is None else bO.detach().float(),
    )  # fmt: skip


def _out_proj(family: str, attn: Any) -> nn.Module:
    if family == "gpt2":
        return attn.c_proj
    if family == "gpt_neox":
        return attn.dense
    return attn.o_proj


def _sliding_window(family: str, attn: nn.Module) -> int | None:
    if family == "mistral":  # one window for every layer, read from the config at call time
        return getattr(attn.config, "sliding_window", None) or None
    return getattr(attn, "sliding_window", None) or None  # Gemma 2: set on its sliding layers


class Heads:
    """Every attention head of a transformers causal LM: `heads[m]` is layer m's `LayerHeads`;
    `rotations(T)` gives R_p for p < T. Families: those of `clt.subject.FAMILIES`."""

    def __init__(self, model: Any, family: str = "auto"):
        self.model = model
        cfg = model.config
        self.family = cfg.model_type if family == "auto" else family
        if self.family not in FAMILIES:
            raise CircuitError(
                f"cannot read the attention heads of model family {self.family!r}; "
                f"supported: {sorted(FAMILIES)}"
            )
        fam = FAMILIES[self.family]
        if fam.masked_lm:
            raise CircuitError(
                f"cannot read the attention heads of {self.family!r} yet: the head analyses assume a "
                "causal, pre-norm decoder (BERT is bidirectional and post-LayerNorm)"
            )
        self.layers = list(_getattr_path(model, fam.layers))
        attn_path, norm_path, post_path = fam.attention
        d = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
        H = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
        H_kv = int(getattr(cfg, "num_key_value_heads", None) or H)
        self.d_model, self.n_heads, self.n_kv = d, H, H_kv
        self.attn_modules: list[nn.Module] = []  # per layer: the attention module
        self.out_projs: list[nn.Module] = []  # its output projection (input: the heads' z, [.., H·D])
        self.pre_norms: list[nn.Module] = []  # the norm before it (its input is resid_pre)
        self.post_norms: list[nn.Module | None] = []  # Gemma 2's norm after it
        self.heads: list[LayerHeads] = []
        for m, layer in enumerate(self.layers):
            try:
                attn = _getattr_path(layer, attn_path)
                norm = _getattr_path(layer, norm_path)
            except AttributeError as e:
                raise CircuitError(
                    f"cannot read the attention of layer {m} of this {self.family} model: {e}"
                ) from e
            D = int(getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or d // H)
            post = _getattr_path(layer, post_path) if post_path else None
            self.attn_modules.append(attn)
            self.pre_norms.append(norm)
            self.post_norms.append(post)
            self.out_projs.append(_out_proj(self.family, attn))
            self.heads.append(self._fold(m, attn, norm, post, D))
        self.head_dim = self.heads[0].head_dim if self.heads else 0
        base = getattr(model, model.base_model_prefix)
        self._rotary = getattr(base, "rotary_emb", None)

    def _fold(self, m, attn, norm, post, D) -> LayerHeads:
        d, H, H_kv = self.d_model, self.n_heads, self.n_kv
        WQ, bQ, WK, bK, WV, bV, WO, bO = _raw_weights(self.family, attn, d, H, H_kv, D)
        gain, beta, centred, eps = norm_affine(norm)

        def fold(W, b):
            Wf = W * gain.to(W.device)
            if centred:
                Wf = Wf - Wf.mean(-1, keepdim=True)  # W diag(γ) N
            bf = torch.zeros(W.shape[:2], device=W.device) if b is None else b.clone()
            return Wf, bf if beta is None else bf + W @ beta.to(W.device)

        WQ, bQ = fold(WQ, bQ)
        WK, bK = fold(WK, bK)
        WV, bV = fold(WV, bV)
        extra: dict[str, Any] = {}
        if hasattr(attn, "q_norm"):
            extra["q_gain"], _, _, extra["qk_eps"] = norm_affine(attn.q_norm)
            extra["k_gain"], _, _, _ = norm_affine(attn.k_norm)
        if post:
            extra["post_gain"], _, _, extra["post_eps"] = norm_affine(post)
        softcap = getattr(attn, "attn_logit_softcapping", None)
        return LayerHeads(
            layer=m,
            W_Q=WQ, b_Q=bQ, W_K=WK, b_K=bK, W_V=WV, b_V=bV, W_O=WO,
            b_O=torch.zeros(d, device=WO.device) if bO is None else bO,
            scaling=float(getattr(attn, "scaling", D**-0.5)),
            softcap=float(softcap) if softcap else None,
            sliding_window=_sliding_window(self.family, attn),
            centred=centred, eps=eps, **extra,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.heads)

    def __getitem__(self, m: int) -> LayerHeads:
        if not 0 <= m < len(self.heads):
            raise CircuitError(f"layer {m}: the model has attention layers 0..{len(self.heads) - 1}")
        return self.heads[m]

    def head(self, m: int, h: int) -> LayerHeads:
        """Layer m's heads, with h checked."""
        lh = self[m]
        lh.check_head(h)
        return lh

    @torch.no_grad()
    def rotations(self, T: int, offset: int = 0) -> torch.Tensor | None:
        """R_p for p = offset..offset+T-1: [T, D, D] (column i = the rotated e_i), or None for a
        model without rotary embeddings (GPT-2)."""
        if self._rotary is None:
            return None
        D = self.head_dim
        p = next(self.model.parameters())
        pos = torch.arange(offset, offset + T, device=p.device)[None]
        cos, sin = self._rotary(torch.zeros(1, T, D, device=p.device, dtype=torch.float32), pos)
        apply = sys.modules[type(self.attn_modules[0]).__module__].apply_rotary_pos_emb
        eye = torch.eye(D, device=p.device)[None, :, None, :].expand(1, D, T, D).contiguous()
        rq, _ = apply(eye, eye, cos.float(), sin.float())  # rq[0, i, p] = R_p e_i
        return rq[0].permute(1, 2, 0).contiguous()


@dataclass
class Recording:
    """One clean forward pass: resid_pre[m] is the input of layer m's pre-attention norm."""

    ids: torch.Tensor  # [B, T]
    resid_pre: list[torch.Tensor]  # L × [B, T, d] (fp32)
    patterns: list[torch.Tensor]  # L × [B, H, T, T] (fp32)
    logits: torch.Tensor  # [B, T, V]


@torch.no_grad()
def record(model: Any, ids: torch.Tensor, family: str = "auto") -> Recording:
    """Run the model (eager attention) on ids [B, T]; keep each layer's resid_pre and pattern."""
    fam = FAMILIES[model.config.model_type if family == "auto" else family]
    layers = list(_getattr_path(model, fam.layers))
    resid: list = [None] * len(layers)
    handles = []

    def pre(m):
        def hook(_mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            resid[m] = x.detach().float()

        return hook

    cfg = model.config
    old = cfg._attn_implementation
    try:
        for m, layer in enumerate(layers):
            norm = _getattr_path(layer, fam.attention[1])
            handles.append(norm.register_forward_pre_hook(pre(m), with_kwargs=True))
        cfg._attn_implementation = "eager"
        out = model(
            input_ids=ids.to(next(model.parameters()).device), output_attentions=True, use_cache=False
        )
    finally:
        cfg._attn_implementation = old
        for hd in handles:
            hd.remove()
    return Recording(
        ids=ids, resid_pre=resid, patterns=[a.float() for a in out.attentions], logits=out.logits.float()
    )
