"""Head detection from attention on repeated random tokens.

ids = [BOS, r_0 … r_{n−1}, r_0 … r_{n−1}] (length T = 2n + 1, r drawn without replacement, so the
only repeats are the planted ones): the first copy sits at positions 1..n, the second at n+1..2n.
For a pattern A [T, T] (query, key), averaged over the batch:

    induction      = mean_{p ∈ [n+1, 2n]} A[p, p − n + 1]    the token after the previous occurrence
    duplicate      = mean_{p ∈ [n+1, 2n]} A[p, p − n]        the previous occurrence itself
    previous-token = mean_{p ∈ [1, 2n]}   A[p, p − 1]

Uniform causal attention gives mean_p 1/(p + 1) for the first two (`uniform_baseline`). The
induction loss is the next-token cross-entropy on the second copy against the first: a model with
induction heads predicts the second copy far better.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CircuitError
from .heads import record


def repeated_tokens(
    batch: int, n: int, low: int, high: int, bos: int | None, seed: int = 0, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """[batch, 2n + 1] (or 2n without a BOS): n distinct ids per row, twice. The ids come from
    [low, high), or from `pool` (a 1-D tensor of distinct ids) when it is given."""
    pool = torch.arange(low, high) if pool is None else pool.flatten().unique()
    if pool.numel() < n:
        raise CircuitError(f"cannot draw {n} distinct tokens from {pool.numel()} ids")
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([pool[torch.randperm(pool.numel(), generator=g)[:n]] for _ in range(batch)])
    rep = torch.cat([rows, rows], 1)
    if bos is None:
        return rep
    return torch.cat([torch.full((batch, 1), bos, dtype=rep.dtype), rep], 1)


def uniform_baseline(n: int) -> float:
    """The induction (and duplicate) score of uniform causal attention: mean_{p∈[n+1,2n]} 1/(p+1)."""
    return sum(1 / (p + 1) for p in range(n + 1, 2 * n + 1)) / n


def pattern_scores(A: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    """A: [..., T, T] with T = 2n + 1 (BOS first) -> {"induction", "duplicate", "previous"}: [...]
    (the batch axis, if any, should be averaged by the caller)."""
    T = A.shape[-1]
    if T != 2 * n + 1:
        raise CircuitError(f"patterns of length {T} are not 2n + 1 = {2 * n + 1} (BOS + two copies of {n})")
    p = torch.arange(n + 1, 2 * n + 1)
    q = torch.arange(1, 2 * n + 1)
    return {
        "induction": A[..., p, p - n + 1].mean(-1),
        "duplicate": A[..., p, p - n].mean(-1),
        "previous": A[..., q, q - 1].mean(-1),
    }


@dataclass
class HeadScores:
    """Pattern scores of every head on repeated random tokens, [L, H] each, and the induction loss."""

    induction: torch.Tensor
    duplicate: torch.Tensor
    previous: torch.Tensor
    loss_first: float  # mean next-token CE predicting the first copy's tokens 2..n
    loss_second: float  # the same for the second copy (positions n+1..2n−1 predicting the next)
    n: int
    batch: int


@torch.no_grad()
def head_scores(
    model: Any,
    n: int = 50,
    batch: int = 4,
    seed: int = 0,
    low: int | None = None,
    high: int | None = None,
    pool: torch.Tensor | None = None,
) -> HeadScores:
    """Run the model on repeated random tokens (module docstring) and score every head. The ids
    come from the middle of the vocabulary by default (1000..min(10000, V)), or from `pool` (for a
    model trained on a small corpus: ids it has seen often, so their embeddings are trained)."""
    V = model.get_input_embeddings().weight.shape[0]
    low = min(1000, V // 10) if low is None else low
    high = min(10000, V) if high is None else high
    bos = getattr(model.config, "bos_token_id", None)
    bos = bos if isinstance(bos, int) and 0 <= bos < V else None
    ids = repeated_tokens(batch, n, low, high, bos, seed, pool)
    if bos is None:  # keep the layout BOS + 2n: use the first id as the BOS stand-in
        ids = torch.cat([torch.full((batch, 1), low, dtype=ids.dtype), ids], 1)
    rec = record(model, ids)
    A = torch.stack(rec.patterns, 1).mean(0)  # [L, H, T, T]
    s = pattern_scores(A, n)
    logp = torch.log_softmax(rec.logits, -1)  # [B, T, V]
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None].to(logp.device))[..., 0]  # [B, T-1]: predicting t+1
    # position t predicts token t+1; first copy = tokens 2..n (from positions 1..n-1), second = n+2..2n
    first = nll[:, 1:n].mean().item()
    second = nll[:, n + 1 : 2 * n].mean().item()
    return HeadScores(s["induction"], s["duplicate"], s["previous"], first, second, n, batch)
