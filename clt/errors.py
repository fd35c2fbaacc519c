"""Every user-facing error of clt, in one place, and the one wrapper that reports them. A
`CLTError` is printed as one line, `error: <message>`, with exit status 2 (by `command`, around
every entry point: the `clt` command, `train.py` and the `python -m` forms), never as a traceback;
the message names what is wrong and what is allowed. Each module re-exports the errors it raises
under their old import paths (`clt.config.ConfigError`, …)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class CLTError(Exception):
    """A user-facing error: bad config, data, subject model, checkpoint or request."""


class ConfigError(CLTError, ValueError):
    """A configuration value that cannot work; the message names the field and what is allowed."""


class DataError(CLTError, ValueError):
    """Text that cannot be read: an empty dataset, a missing text column."""


class CacheError(CLTError, ValueError):
    """A cache that cannot be used or written: another model or hook, missing or damaged shards,
    a full disk. The message says what and how to fix it."""


class SubjectModelError(CLTError, ValueError):
    """A subject model that cannot be loaded or hooked (unknown family, missing hook point)."""


class CheckpointError(CLTError, RuntimeError):
    """A checkpoint that cannot be read or does not match (format, shapes, the wrong CLT)."""


class TrainingError(CLTError, RuntimeError):
    """Training cannot go on: too many non-finite steps in a row, non-finite weights, a checkpoint
    that cannot be written. The message names the step and the last good checkpoint."""


class ShardingError(CLTError, ValueError):
    """A feature-sharded layout that does not fit (F not divisible by the shards, missing shards)."""


class AttributionError(CLTError, ValueError):
    """Bad input to attribution: prompt, thresholds, or a CLT that does not fit the model."""


class CircuitError(CLTError, ValueError):
    """A head or layer that does not exist, a model whose attention weights cannot be read, a task
    prompt whose answer is not one token."""


class FeatureError(CLTError, ValueError):
    """Feature cards that cannot be computed, read or written: the message says what and why."""


class ViewerError(CLTError, ValueError):
    """A request the viewer cannot serve; `status` is the HTTP status, the message is shown in the
    page and in the log."""

    status = 400


class NotFound(ViewerError):
    status = 404


class Conflict(ViewerError):
    status = 409


class BadGraph(ViewerError):
    status = 422


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a Hub id (`name` or `org/name`)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def hub_unavailable(key: str, name: str, kind: str, error: BaseException | None = None) -> str:
    """The one-line message for a Hub `kind` ("model" | "dataset") named `name` (by the setting
    `key`) that is neither a local path nor loadable: what is missing and what to do."""
    import os

    from huggingface_hub import constants

    chain, e = [], error
    while e is not None:
        chain.append(type(e).__name__)
        e = e.__cause__ or e.__context__
    offline = constants.HF_HUB_OFFLINE or (kind == "dataset" and os.environ.get("HF_DATASETS_OFFLINE") == "1")
    if any(n in ("RepositoryNotFoundError", "DatasetNotFoundError", "GatedRepoError") for n in chain):
        return (
            f"{key}={name!r}: no such {kind} on the Hugging Face Hub (or it is private or gated: "
            "log in with `hf auth login`), and no local path of that name"
        )
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hub cannot be reached from here"
    cache = constants.HF_HUB_CACHE
    return (
        f"{key}={name!r}: not a local path, not in the Hugging Face cache ({cache}), and {why}; "
        f"download it where there is network (`hf download {name}"
        + (" --repo-type dataset" if kind == "dataset" else "")
        + "`) into that cache (or set HF_HOME to one), or give a local path"
    )


def command(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap an entry point: its result as an exit status (None = 0), and a `CLTError` as the one
    line `error: <message>` on stderr and status 2. Any other exception is a bug and keeps its
    traceback."""

    @functools.wraps(main)
    def entry(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except CLTError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return entry
