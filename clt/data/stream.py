"""Activations: run the subject model over packed windows, capture every layer at once, drop BOS
positions, shuffle tokens through a buffer and yield training batches.

The buffer works in blocks: `buffer_tokens` tokens are generated from consecutive windows (many
documents), permuted with a generator seeded by (seed, block), and cut into batches. A batch's
position is (block, batch within block, text position at the block's start), so a run resumes
exactly: regenerate that block from its text position and skip the batches already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import DataConfig
from ..subject import Subject
from .text import TextPosition, WindowStream


@dataclass
class DataPosition:
    block: int = 0
    batch: int = 0  # batches of this block already consumed
    text: TextPosition | None = None  # text position at the start of the block

    def to_dict(self) -> dict:
        return {"block": self.block, "batch": self.batch, "text": (self.text or TextPosition()).to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> DataPosition:
        return cls(int(d["block"]), int(d["batch"]), TextPosition.from_dict(d["text"]))


@torch.no_grad()
def window_activations(
    subject: Subject, windows: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """windows: [B, T] -> x, y: [B·(T−1), L, d] on the CPU (in `dtype`, default the subject's), with
    the BOS positions dropped."""
    x, y = subject.capture(windows)
    L, d = x.shape[-2:]
    dtype = dtype or x.dtype
    return x[:, 1:].reshape(-1, L, d).to("cpu", dtype), y[:, 1:].reshape(-1, L, d).to("cpu", dtype)


class ActivationSource:
    def __init__(
        self,
        subject: Subject,
        cfg: DataConfig,
        batch_tokens: int,
        seed: int = 0,
        replica: tuple[int, int] = (0, 1),
    ):
        self.subject, self.cfg = subject, cfg
        self.batch_tokens, self.seed = batch_tokens, seed
        self.text = WindowStream(cfg, subject.tokenizer, replica)  # (replica, n_replicas)
        self.dtype = getattr(torch, cfg.buffer_dtype)

    def activations(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """windows: [B, T] -> x, y: [B·(T−1), L, d] with the BOS positions dropped."""
        return window_activations(self.subject, windows, self.dtype)

    def _generate(
        self, windows: Iterator[tuple[torch.Tensor, TextPosition]], n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, TextPosition]:
        """Generate at least n_tokens tokens of activations from the window iterator."""
        xs, ys, got, pos = [], [], 0, None
        per_window = self.cfg.context_size - 1
        while got < n_tokens:
            batch = []
            want = min(self.cfg.batch_windows, -(-(n_tokens - got) // per_window))
            for _ in range(want):
                w, pos = next(windows)
                batch.append(w)
            x, y = self.activations(torch.stack(batch))
            xs.append(x)
            ys.append(y)
            got += x.shape[0]
        assert pos is not None
        return torch.cat(xs), torch.cat(ys), pos

    def first_activations(self, n_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations of the first `n_batches` forward passes of the training stream (for the
        normalisation scalars and the initialisation)."""
        n = n_batches * self.cfg.batch_windows * (self.cfg.context_size - 1)
        x, y, _ = self._generate(self.text.windows(TextPosition()), n)
        return x, y

    def split_for_replica(self, replica: int, n_replicas: int, global_batch: int) -> None:
        """Data-parallel replica `replica` of `n_replicas`: its own share of the text documents and
        its share of the global batch."""
        self.text.replica = (replica, n_replicas)
        self.batch_tokens = global_batch // n_replicas

    def eval_windows(self) -> torch.Tensor:
        return self.text.eval_windows()

    def batches(self, start: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """Yield (x, y: [batch_tokens, L, d], position after this batch as a dict) forever."""
        pos = DataPosition.from_dict(start) if start else DataPosition(text=TextPosition())
        block, skip = pos.block, pos.batch
        text_pos = pos.text or TextPosition()
        windows = self.text.windows(text_pos)
        while True:
            x, y, next_text = self._generate(windows, self.cfg.buffer_tokens)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
            perm = torch.randperm(x.shape[0], generator=g)
            n_batches = x.shape[0] // self.batch_tokens
            for j in range(skip, n_batches):
                idx = perm[j * self.batch_tokens : (j + 1) * self.batch_tokens]
                after = (
                    DataPosition(block + 1, 0, next_text)
                    if j + 1 == n_batches
                    else DataPosition(block, j + 1, text_pos)
                )
                yield x[idx], y[idx], after.to_dict()
            block, skip, text_pos = block + 1, 0, next_text
