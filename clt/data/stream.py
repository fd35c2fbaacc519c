"""Activations: run the subject model over packed windows, capture every layer at once, drop BOS
positions, shuffle tokens through a buffer and yield training batches.

The buffer works in blocks: `buffer_tokens` tokens are generated from consecutive windows (many
documents), permuted with a generator seeded by (seed, block), and cut into batches. A batch's
position is (block, batch within block, text position at the block's start), so a run resumes
exactly: regenerate that block from its text position and skip the batches already trained on.

With prefetch (`data.prefetch`), the next block is generated in a background thread while the CLT
trains on this one (`Prefetch`; on a GPU on its own CUDA stream). The blocks, and so the batches,
are the same with and without it. The subject is shared with the evaluation, so each forward pass
holds `Subject.lock`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
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
    subject: Subject,
    windows: torch.Tensor,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """windows: [B, T] -> x, y: [B·(T−1), L, d] on `device` (default the CPU; in `dtype`, default
    the subject's), with the BOS positions dropped."""
    with subject.lock:
        x, y = subject.capture(windows)
    L, d = x.shape[-2:]
    dtype = dtype or x.dtype
    return x[:, 1:].reshape(-1, L, d).to(device, dtype), y[:, 1:].reshape(-1, L, d).to(device, dtype)


class Prefetch:
    """Iterates `items` one item ahead in a background thread: while the consumer works on item i,
    the thread computes item i + 1 (at most one waits, finished). On a CUDA device the thread runs
    on its own stream and the consumer's stream waits for each item's event before using it. An
    exception in the thread is raised by the consumer's next(). `close()` stops the thread."""

    def __init__(self, items: Iterator, device: torch.device):
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._device = device
        self._thread = threading.Thread(target=self._run, args=(items,), daemon=True, name="clt-prefetch")
        self._thread.start()

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator) -> None:
        try:
            cuda = self._device.type == "cuda"
            stream = torch.cuda.Stream(self._device) if cuda else None
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for item in items:
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not self._put((item, event, None)):
                        return
            self._put((None, None, StopIteration()))
        except BaseException as e:  # raised in the consumer
            self._put((None, None, e))

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self):
        item, event, error = self._queue.get()
        if error is not None:
            raise error
        if event is not None:
            current = torch.cuda.current_stream(self._device)
            current.wait_event(event)
            for t in item:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(current)  # (its memory is not reused while this stream uses it)
        return item

    def close(self) -> None:
        self._stop.set()


def buffer_placement(subject: Subject, cfg: DataConfig, prefetch: bool) -> tuple[torch.dtype, torch.device]:
    """The buffer's dtype and device (`data.buffer_dtype`, `data.buffer_device`; "auto" as
    documented there)."""
    gpu = subject.device.type == "cuda"
    if cfg.buffer_dtype == "auto":
        dtype = subject.dtype if gpu else torch.float32
    else:
        dtype = getattr(torch, cfg.buffer_dtype)
    device = torch.device("cpu")
    if cfg.buffer_device == "subject":
        device = subject.device
    elif cfg.buffer_device == "auto" and gpu:
        held = cfg.buffer_tokens * (2 if prefetch else 1) * 2 * subject.n_layers * subject.d_model
        total = torch.cuda.get_device_properties(subject.device).total_memory
        device = subject.device if held * dtype.itemsize <= total / 8 else device
    return dtype, device


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
        gpu = subject.device.type == "cuda"
        self.prefetch = cfg.prefetch == "on" or (cfg.prefetch == "auto" and gpu)
        self.dtype, self.device = buffer_placement(subject, cfg, self.prefetch)
        self._prefetchers: list[Prefetch] = []

    def close(self) -> None:
        """Stop the background generation of every `batches` iterator (the end of training)."""
        for p in self._prefetchers:
            p.close()
        self._prefetchers.clear()

    def activations(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """windows: [B, T] -> x, y: [B·(T−1), L, d] with the BOS positions dropped."""
        return window_activations(self.subject, windows, self.dtype, self.device)

    def _generate(
        self, windows: Iterator[tuple[torch.Tensor, TextPosition]], n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, TextPosition, torch.Tensor]:
        """Generate at least n_tokens tokens of activations from the window iterator: (x, y, the
        text position after them, their token ids)."""
        xs, ys, toks, got, pos = [], [], [], 0, None
        per_window = self.cfg.context_size - 1
        while got < n_tokens:
            batch = []
            want = min(self.cfg.batch_windows, -(-(n_tokens - got) // per_window))
            for _ in range(want):
                w, pos = next(windows)
                batch.append(w)
            windows_ids = torch.stack(batch)
            x, y = self.activations(windows_ids)
            xs.append(x)
            ys.append(y)
            toks.append(windows_ids[:, 1:].reshape(-1))
            got += x.shape[0]
        assert pos is not None
        return torch.cat(xs), torch.cat(ys), pos, torch.cat(toks)

    def first_activations(self, n_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations of the first `n_batches` forward passes of the training stream (for the
        normalisation scalars and the initialisation)."""
        n = n_batches * self.cfg.batch_windows * (self.cfg.context_size - 1)
        x, y, _, _ = self._generate(self.text.windows(TextPosition()), n)
        return x, y

    def split_for_replica(self, replica: int, n_replicas: int, global_batch: int) -> None:
        """Data-parallel replica `replica` of `n_replicas`: its own share of the text documents and
        its share of the global batch."""
        self.text.replica = (replica, n_replicas)
        self.batch_tokens = global_batch // n_replicas

    def eval_windows(self) -> torch.Tensor:
        return self.text.eval_windows()

    def batches(self, start: dict | None = None, tokens: bool = False) -> Iterator[tuple]:
        """Yield (x, y: [batch_tokens, L, d], position after this batch as a dict) forever (with
        `tokens`, the batch's token ids [batch_tokens] before the position)."""
        pos = DataPosition.from_dict(start) if start else DataPosition(text=TextPosition())
        block, skip = pos.block, pos.batch
        text_pos = pos.text or TextPosition()
        windows = self.text.windows(text_pos)
        blocks: Iterator[tuple[torch.Tensor, torch.Tensor, TextPosition, torch.Tensor]] = (
            self._generate(windows, self.cfg.buffer_tokens)
            for _ in iter(int, 1)  # forever
        )
        if self.prefetch:
            blocks = Prefetch(blocks, self.subject.device)
            self._prefetchers.append(blocks)
        try:
            for x, y, next_text, tok in blocks:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
                perm = torch.randperm(x.shape[0], generator=g).to(x.device)
                n_batches = x.shape[0] // self.batch_tokens
                for j in range(skip, n_batches):
                    idx = perm[j * self.batch_tokens : (j + 1) * self.batch_tokens]
                    after = (
                        DataPosition(block + 1, 0, next_text)
                        if j + 1 == n_batches
                        else DataPosition(block, j + 1, text_pos)
                    )
                    if tokens:
                        yield x[idx], y[idx], tok[idx.cpu()], after.to_dict()
                    else:
                        yield x[idx], y[idx], after.to_dict()
                block, skip, text_pos = block + 1, 0, next_text
        finally:
            if isinstance(blocks, Prefetch):
                blocks.close()
