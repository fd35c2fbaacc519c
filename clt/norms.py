"""The subject model's normalisations as plain affine maps, shared by attribution, feature cards
and the circuit analyses.

A RMSNorm / LayerNorm computes  y = γ̃ ⊙ z / σ(z) + β,  z = x (RMSNorm) or x − mean(x) (LayerNorm),
σ(z) = sqrt(mean(z²) + eps), with γ̃ = w, or 1 + w for Gemma's RMSNorm. With σ frozen (a prompt's
value) the norm is linear in x, which is what lets attribution, virtual weights and the QK
decomposition pass through it. The gain's form is found by running the module on a probe, never
guessed from the family's name, so a norm of another form fails loudly instead of giving wrong
numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import CLTError


def norm_kind(module: nn.Module) -> str | None:
    """ "layer" (LayerNorm: centres), "rms" (any *RMSNorm class) or None (not a norm)."""
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if type(module).__name__.endswith("RMSNorm"):
        return "rms"
    return None


def norm_eps(module: nn.Module) -> float:
    eps = getattr(module, "variance_epsilon", None)
    return float(getattr(module, "eps", 1e-6) if eps is None else eps)


def inv_sigma(r: torch.Tensor, centred: bool, eps: float) -> torch.Tensor:
    """The norm's per-position 1/σ of r: [..., n] -> [..., 1]."""
    z = r - r.mean(-1, keepdim=True) if centred else r
    return torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)


def deviation_tolerance(out: torch.Tensor, dtype: torch.dtype) -> float:
    """How far a module's own output may sit from the affine form: a few units of its dtype's
    rounding (the module rounds at its own points), at least 1e-3, relative to the output's size."""
    return max(1e-3, 4 * torch.finfo(dtype).eps) * (out.float().abs().max().item() + 1.0)


def norm_affine(
    module: Any, error: type[Exception] = CLTError
) -> tuple[torch.Tensor, torch.Tensor | None, bool, float]:
    """A RMSNorm/LayerNorm module -> (gain γ̃ [n] float32, bias β [n] or None, centred, eps).
    `error` is the caller's error class for a module that is not a plain norm."""
    name = type(module).__name__
    kind = norm_kind(module)
    if kind is None:
        raise error(f"cannot fold {name}: not a RMSNorm or LayerNorm")
    centred, eps = kind == "layer", norm_eps(module)
    w = getattr(module, "weight", None)
    n: int = int(w.shape[-1]) if w is not None else int(module.normalized_shape[-1])
    p = next(module.parameters(), None)
    probe = torch.randn(3, n, generator=torch.Generator().manual_seed(0))
    if p is not None:
        probe = probe.to(p.device, p.dtype)
    with torch.no_grad():
        out = module(probe).float()
    zf = probe.float()
    z = (zf - zf.mean(-1, keepdim=True) if centred else zf) * inv_sigma(zf, centred, eps)
    b = getattr(module, "bias", None)
    b = None if b is None else b.detach().float()
    best = None
    gains = [torch.ones(n, device=z.device)] if w is None else [w.detach().float(), 1.0 + w.detach().float()]
    for gain in gains:
        err = ((z * gain + (0 if b is None else b)) - out).abs().max().item()
        if best is None or err < best[0]:
            best = (err, gain)
    assert best is not None
    if best[0] > deviation_tolerance(out, probe.dtype):
        raise error(f"cannot fold {name}: it is not a plain RMSNorm/LayerNorm (deviation {best[0]:.3g})")
    return best[1], b, centred, eps


def final_norm(model: Any) -> nn.Module | None:
    """The norm before the unembedding of a causal LM: the base model's `norm` (Llama, Qwen,
    Gemma), `ln_f` (GPT-2) or `final_layer_norm` (NeoX), else its last norm module; None if it has
    none."""
    base = getattr(model, model.base_model_prefix, model)
    for name in ("norm", "ln_f", "final_layer_norm"):
        m = getattr(base, name, None)
        if isinstance(m, nn.Module) and norm_kind(m) is not None:
            return m
    norms = [m for m in base.modules() if norm_kind(m) is not None]
    return norms[-1] if norms else None
