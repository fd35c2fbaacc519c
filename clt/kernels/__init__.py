"""CLT decode kernels: fused Triton sparse cross-layer decode on GPU, plain-torch reference paths
(`kernels.reference`) on CPU and as the test oracle.

`decode(a, W_dec, support, impl)` is what the CLT calls. `impl`:
- "auto": Triton on CUDA tensors when Triton imports, else the sparse path when few features are
  active (≤ 25% where the C kernel serves, fp32 on CPU; ≤ 10% otherwise), else dense;
- "triton" | "sparse" | "dense": that path (Triton on CPU needs TRITON_INTERPRET=1, fp32 only).
The environment variable CLT_KERNELS=torch|triton overrides "auto".
"""

from __future__ import annotations

import functools
import os

import torch

from ..config import DECODE_PATHS
from ..sparsity import SparseActivations, TopKActivations
from . import cpu
from .reference import decode_dense, decode_entries, decode_sparse, to_padded


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor, impl: str = "auto") -> bool:
    """Whether the Triton kernels serve tensor `t` under `impl` (and CLT_KERNELS); raises a clear
    error when they are asked for but cannot run."""
    if impl not in DECODE_PATHS:
        raise ValueError(f"decode implementation {impl!r}: expected one of {DECODE_PATHS}")
    env = os.environ.get("CLT_KERNELS", "")
    if impl == "auto":
        wanted = env == "triton" or (env != "torch" and t.is_cuda and triton_available())
    else:
        wanted = impl == "triton"
    if wanted and not triton_available():
        raise RuntimeError(
            "the Triton kernels were requested but triton is not installed (pip install triton)"
        )
    if wanted and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "the Triton kernels need a CUDA device; on CPU set TRITON_INTERPRET=1 "
            "(interpreter: fp32, slow) or use clt.decode=sparse|dense"
        )
    return wanted


Activations = torch.Tensor | TopKActivations | SparseActivations


def choose(a: Activations, impl: str = "auto") -> str:
    """The decode path `decode` takes for activations `a` ([N, L, F] or their entries)."""
    t = a.vals if isinstance(a, TopKActivations | SparseActivations) else a
    if use_triton(t, impl):
        return "triton"
    if impl != "auto":
        return impl
    if isinstance(a, TopKActivations):
        density = a.idx.shape[-1] / a.d_sae
    elif isinstance(a, SparseActivations):
        density = a.vals.numel() / (a.n * len(a.counts) * a.d_sae)
    else:
        density = float((a != 0).float().mean())
    # the C kernel's sparse decode beats the dense one further: at the demo shape, 10% active,
    # the whole JumpReLU step took 1.2 s sparse against 2.3 s dense
    limit = 0.25 if cpu.usable(t) else 0.1
    return "sparse" if density <= limit else "dense"


def decode(
    a: Activations,
    W_dec: list[torch.Tensor],
    support: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """a: [N, L, F] or its entries, W_dec[s]: [F, L − s, d] -> Σ_{s ≤ t} a_s W_dec[s][:, t − s]:
    [N, L, d]. `support`: positions whose ∂L/∂a is needed (default: a ≠ 0); sparse paths are exact
    there. Entries (TopK's, `SparseActivations`) are their own support (an entry whose value is 0
    gets its ∂a too)."""
    path = choose(a, impl)
    if isinstance(a, SparseActivations):
        if path == "dense":
            return decode_dense(a.dense(), W_dec)
        if path == "triton":
            from .triton_decode import decode_triton

            return decode_triton(*to_padded(a.dense(), a.support()), W_dec)
        rows_s, cols_s, vals_s = a.per_layer()
        return decode_entries(rows_s, cols_s, vals_s, W_dec, a.n)
    if isinstance(a, TopKActivations):
        if path == "dense":
            return decode_dense(a.dense(), W_dec)
        if path == "triton":  # the entries are the padded format already (full rows, index order)
            from .triton_decode import decode_triton

            idx, order = a.idx.sort(dim=-1)
            return decode_triton(idx, a.vals.gather(-1, order), W_dec)
        n, L, k = a.vals.shape
        rows = torch.arange(n, device=a.vals.device).repeat_interleave(k)  # token order
        cols = [c.reshape(-1) for c in a.idx.unbind(1)]  # per source layer, [n·k]
        vals = [v.reshape(-1) for v in a.vals.unbind(1)]
        return decode_entries([rows] * L, cols, vals, W_dec, n)
    if path == "triton":
        from .triton_decode import decode_triton

        return decode_triton(*to_padded(a, support), W_dec)
    if path == "sparse":
        return decode_sparse(a, W_dec, support)
    return decode_dense(a, W_dec)


def encode_fused(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    theta: torch.Tensor | None,
    activation: str,
    bandwidth: float = 1.0,
    ste_to_input: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton GEMM + bias + JumpReLU/ReLU epilogue: x [N, L, d] (normalised) -> (h, a) [N, L, F]."""
    from .triton_encode import encode_triton

    return encode_triton(x, W_enc, b_enc, theta, activation, bandwidth, ste_to_input)


__all__ = [
    "DECODE_PATHS",
    "choose",
    "decode",
    "encode_fused",
    "use_triton",
    "decode_dense",
    "decode_sparse",
    "to_padded",
    "triton_available",
]
