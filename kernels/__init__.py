"""CLT decode kernels: fused Triton sparse cross-layer decode on GPU, plain-torch reference paths
(`kernels.reference`) on CPU and as the test oracle.

`decode(a, W_dec, support, impl)` is what the CLT calls. `impl`:
- "auto": Triton on CUDA tensors when Triton imports, else the torch sparse path when few
  features are active (≤ 10%), else dense;
- "triton" | "sparse" | "dense": that path (Triton on CPU needs TRITON_INTERPRET=1, fp32 only).
The environment variable CLT_KERNELS=torch|triton overrides "auto".
"""

from __future__ import annotations

import functools
import os

import torch

from .reference import decode_dense, decode_sparse, to_padded

IMPLS = ("auto", "triton", "sparse", "dense")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose(a: torch.Tensor, impl: str = "auto") -> str:
    """The decode path `decode` takes for activations `a` ([N, L, F])."""
    if impl not in IMPLS:
        raise ValueError(f"decode implementation {impl!r}: expected one of {IMPLS}")
    if impl != "auto":
        return impl
    env = os.environ.get("CLT_KERNELS", "")
    if env == "triton":
        return "triton"
    if env != "torch" and a.is_cuda and triton_available():
        return "triton"
    return "sparse" if bool((a != 0).float().mean() <= 0.1) else "dense"


def decode(a: torch.Tensor, W_dec: list[torch.Tensor], support: torch.Tensor | None = None,
           impl: str = "auto") -> torch.Tensor:
    """a: [N, L, F], W_dec[s]: [F, L − s, d] -> Σ_{s ≤ t} a_s W_dec[s][:, t − s]: [N, L, d].
    `support`: positions whose ∂L/∂a is needed (default: a ≠ 0); sparse paths are exact there."""
    path = choose(a, impl)
    if path == "triton":
        from .triton_decode import decode_triton
        return decode_triton(*to_padded(a, support), W_dec)
    if path == "sparse":
        return decode_sparse(a, W_dec, support)
    return decode_dense(a, W_dec)


__all__ = ["IMPLS", "choose", "decode", "decode_dense", "decode_sparse", "to_padded", "triton_available"]
