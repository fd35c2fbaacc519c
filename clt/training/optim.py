"""Adam with an option of bf16 moments for some parameter groups (the decoder: at L = 30,
F = 18,432, d = 576 its fp32 weights, gradient and two fp32 moments are 79 GB; with bf16 moments
59 GB, so the whole CLT trains on one 80 GB GPU).

Groups whose `moments` is "fp32" (the default) take torch's Adam as configured (fused or foreach).
A group with `moments="bf16"` keeps exp_avg and exp_avg_sq in bf16: each step reads them into
fp32, takes torch's Adam update there,

    m ← β₁ m + (1 − β₁) g      v ← β₂ v + (1 − β₂) g²      p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

and writes them back by stochastic rounding: round-to-nearest would stall v, whose per-step change
(a factor 1 − β₂ = 10⁻³) is below half of bf16's spacing (2⁻⁸ relative). The rounding's random
bits come from a generator seeded by (group, parameter, step), so a resumed run draws the same
bits: resume stays exact. `grad_scale` (the gradient clip folded into the step, `CLTModule`) divides
the gradients in both kinds of group.
"""

from __future__ import annotations

import torch

from ..config import MOMENTS


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding each value's magnitude up with probability equal to the dropped
    fraction of its last bf16 place (unbiased: E[round(x)] = x)."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)  # (exact: low bits 0)


class Adam(torch.optim.Adam):
    """torch.optim.Adam plus param groups with `moments="bf16"` (module docstring)."""

    def __init__(self, params, seed: int = 0, **kw):
        super().__init__(params, **kw)
        self.seed = seed
        for g in self.param_groups:
            g.setdefault("moments", "fp32")
            if g["moments"] not in MOMENTS:
                raise ValueError(f"moments={g['moments']!r}: expected one of {MOMENTS}")

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # (torch casts every moment to its parameter's dtype)
        for g in self.param_groups:
            if g["moments"] == "bf16":
                for p in g["params"]:
                    for k in ("exp_avg", "exp_avg_sq"):
                        if k in self.state[p]:
                            self.state[p][k] = self.state[p][k].to(torch.bfloat16)  # (exact: bf16 values)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        full = [g for g in groups if g["moments"] == "fp32"]
        try:  # torch's own step over the fp32-moment groups
            self.param_groups = full
            if full:
                super().step()
        finally:
            self.param_groups = groups
        for i, g in enumerate(groups):
            if g["moments"] == "bf16":
                self._bf16_step(i, g)
        return loss

    def _bf16_step(self, gi: int, group: dict) -> None:
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        scale = getattr(self, "grad_scale", None)
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
            state["step"] += 1
            t = int(state["step"])
            g = p.grad.float()
            if scale is not None:
                g = g / scale.to(g.device)
            if wd:
                g = g + wd * p
            m = state["exp_avg"].float().lerp_(g, 1 - b1)
            v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / (1 - b2**t) ** 0.5).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1 - b1**t))
            gen = torch.Generator(device=p.device).manual_seed(hash((self.seed, gi, pi, t)) & (2**62 - 1))
            state["exp_avg"].copy_(stochastic_round_bf16(m, gen))
            state["exp_avg_sq"].copy_(stochastic_round_bf16(v, gen))
