"""Activation cache: generate the subject's activations once, train many CLTs from them.

On disk (`cache.dir`):

    plan.json                     what this cache is: subject model, hooks, text, storage, sizes
                                  (written first; every later generation must match it)
    eval.safetensors              the held-out windows [W, T] (so training needs no text at all)
    shards/shard-NNNNNN.safetensors  windows [s·S, (s+1)·S) of the training stream, BOS dropped:
                                  x, y [N, L, d] bf16 (or x_q, y_q int8 + x_scale, y_scale [N, L]),
                                  tokens [N] int32, docs [N] int64 (training-document index)
    shards/shard-NNNNNN.json      its sidecar, written after the shard (the commit point): windows,
                                  tokens, sha256, bytes, per-layer norm sums
    end.json                      only when the corpus ended before `cache.tokens`
    manifest.json                 plan + every shard's checksum + totals + normalisation statistics,
                                  written once every shard is there (by the last task to finish,
                                  or `python -m clt.cache merge DIR`)

The cache holds the first `tokens` tokens of exactly the window stream online training reads
(same packing, same subject forward batches), so reading it in "stream" order gives the batches
of online generation with the same seed. Shards are independent files written atomically: an
interrupted generation resumes at the first missing shard, a Slurm array task writes its own
contiguous share of the shards, and a damaged shard is found by its checksum and regenerated
alone.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import CacheJobConfig, DataConfig, ModelConfig, _get, config_diff
from ..errors import CacheError  # noqa: F401 (re-exported)
from ..files import atomic_file, sha256, write_atomic
from .stream import window_activations
from .text import TextPosition, WindowStream

FORMAT = 1
TEXT_KEYS = (
    "dataset",
    "name",
    "split",
    "text_column",
    "context_size",
    "eval_docs",
    "eval_windows",
    "min_doc_chars",
    "batch_windows",
)


def shard_path(root: Path, s: int) -> Path:
    return root / "shards" / f"shard-{s:06d}.safetensors"


def sidecar_path(root: Path, s: int) -> Path:
    return root / "shards" / f"shard-{s:06d}.json"


# ---------------------------------------------------------------------------------------------
# The plan: what a cache is


def make_plan(
    subject, model: ModelConfig, data: DataConfig, tokens: int, shard_tokens: int, storage: str
) -> dict:
    per = data.context_size - 1  # tokens per window (BOS dropped)
    shard_windows = -(-shard_tokens // per)
    n_windows = -(-tokens // per)
    return {
        "format": FORMAT,
        "subject": {
            "name_or_path": model.name_or_path,
            "revision": model.revision,
            "family": subject.family_name,
            "dtype": str(subject.dtype).removeprefix("torch."),
            "n_layers": subject.n_layers,
            "d_model": subject.d_model,
        },
        "hooks": {"input": model.input_hook, "output": model.output_hook},
        "text": {k: getattr(data, k) for k in TEXT_KEYS},
        "storage": storage,
        "window_tokens": per,
        "shard_windows": shard_windows,
        "n_windows": n_windows,
        "n_shards": -(-n_windows // shard_windows),
    }


def _describe(plan: dict) -> str:
    s, h = plan["subject"], plan["hooks"]
    return (
        f"{s['name_or_path']} ({s['n_layers']} layers × d={s['d_model']}, {s['dtype']}), "
        f"{h['input']} → {h['output']}, text {plan['text']['dataset']!r} in windows of "
        f"{plan['text']['context_size']}, {plan['storage']}, {plan['n_windows']} windows in shards of "
        f"{plan['shard_windows']}"
    )


def write_or_check_plan(root: Path, plan: dict) -> None:
    path = root / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k}: cache has {_get(old, k)!r}, asked {_get(plan, k)!r}" for k in config_diff(old, plan)]
        if diff:
            raise CacheError(
                f"cache.dir={str(root)!r} holds another cache ({_describe(old)}); this "
                f"generation differs in {'; '.join(diff)}. Use another cache.dir, or the "
                "cache's settings to resume it"
            )
        return
    (root / "shards").mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(plan, indent=1))


# ---------------------------------------------------------------------------------------------
# Writing


def quantize(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v: [N, L, d] -> (int8 [N, L, d], scale float32 [N, L]): one scale per token and layer."""
    v = v.float()
    scale = v.abs().amax(-1).clamp_min(1e-12) / 127
    return (v / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[..., None]


def shard_ok(root: Path, s: int, verify: bool) -> bool:
    """Shard s is complete (sidecar written, size right) and, with `verify`, its checksum matches."""
    side, path = sidecar_path(root, s), shard_path(root, s)
    if not side.exists() or not path.exists():
        return False
    meta = json.loads(side.read_text())
    if path.stat().st_size != meta["bytes"]:
        return False
    return not verify or sha256(path) == meta["sha256"]


def write_shard(
    root: Path,
    s: int,
    first_window: int,
    windows: torch.Tensor,
    docs: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    storage: str,
) -> dict:
    """windows, docs: [W, T]; x, y: [W·(T−1), L, d] -> the shard file, then its sidecar."""
    xf, yf = x.float(), y.float()
    tensors = {
        "tokens": windows[:, 1:].reshape(-1).to(torch.int32).contiguous(),
        "docs": docs[:, 1:].reshape(-1).contiguous(),
        "y_sum": yf.sum(0).contiguous(),
    }  # [L, d], for the manifest's mean of y
    if storage == "int8":
        (tensors["x_q"], tensors["x_scale"]), (tensors["y_q"], tensors["y_scale"]) = (
            quantize(xf),
            quantize(yf),
        )
    else:
        tensors["x"], tensors["y"] = x.to(torch.bfloat16).contiguous(), y.to(torch.bfloat16).contiguous()
    path = shard_path(root, s)
    try:
        with atomic_file(path) as tmp:
            # one metadata entry: safetensors writes a map of several in no fixed order (checksums would
            # differ)
            save_file(tensors, str(tmp), metadata={"format": "clt-activation-cache"})
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        meta = {
            "index": s,
            "first_window": first_window,
            "windows": int(windows.shape[0]),
            "tokens": int(x.shape[0]),
            "docs": [int(docs[:, 1:].min()), int(docs[:, 1:].max())],
            "sha256": sha256(path),
            "bytes": path.stat().st_size,
            "x_norm_sum": xf.norm(dim=-1).sum(0).tolist(),
            "y_norm_sum": yf.norm(dim=-1).sum(0).tolist(),
            "y_sq_sum": yf.pow(2).sum((0, 2)).tolist(),
        }
        write_atomic(sidecar_path(root, s), json.dumps(meta))
        return meta
    except OSError as e:
        path.unlink(missing_ok=True)  # a shard without its sidecar is not finished
        done = sum(1 for _ in (root / "shards").glob("shard-*.json"))
        what = "the disk is full" if e.errno == errno.ENOSPC else f"{e.strerror or e}"
        raise CacheError(
            f"writing shard {s} of {root} failed: {what}. The {done} finished shards are "
            "intact; free space (or fix the error) and run the same command again to "
            "resume from the first missing shard"
        ) from e


def array_task(cfg, what: str = "cache") -> tuple[int, int]:
    """(task, tasks) of a job split over a Slurm array: `cfg.task` / `cfg.tasks`, -1 = from
    SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT (else 0 of 1)."""
    task, tasks = cfg.task, cfg.tasks
    if tasks == -1:
        tasks = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
    if task == -1:
        task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0")) - int(
            os.environ.get("SLURM_ARRAY_TASK_MIN", "0")
        )
    if not 0 <= task < tasks:
        raise CacheError(f"{what}.task={task} does not exist among {what}.tasks={tasks}")
    return task, tasks


def generate(subject, job: CacheJobConfig, progress: bool = True) -> dict | None:
    """Write this task's shards of the cache (resuming: finished, intact shards are kept) and, when
    every shard is there, the manifest. Returns the manifest, or None while other tasks' shards are
    missing."""
    from tqdm import tqdm

    root, c, data = Path(job.cache.dir), job.cache, job.data
    task, tasks = array_task(c)
    plan = make_plan(subject, job.model, data, c.tokens, c.shard_tokens, c.dtype)
    write_or_check_plan(root, plan)
    sw, n_windows, n_shards = plan["shard_windows"], plan["n_windows"], plan["n_shards"]
    stream = WindowStream(data, subject.tokenizer)
    if task == 0 and not (root / "eval.safetensors").exists():
        with atomic_file(root / "eval.safetensors") as tmp:
            save_file({"windows": stream.eval_windows().contiguous()}, str(tmp))

    lo, hi = task * n_shards // tasks, (task + 1) * n_shards // tasks
    end = _end(root)
    todo = []
    for s in range(lo, hi):
        if end is not None and s * sw >= end:
            break
        if shard_ok(root, s, verify=True):
            continue
        if sidecar_path(root, s).exists() or shard_path(root, s).exists():
            print(f"shard {s}: incomplete or damaged (checksum), regenerating it")
            sidecar_path(root, s).unlink(missing_ok=True)
        todo.append(s)
    per = plan["window_tokens"]
    bar = tqdm(
        total=sum(min(sw, n_windows - s * sw) for s in todo) * per,
        unit="tok",
        unit_scale=True,
        desc=f"cache task {task}/{tasks}",
        disable=not progress,
    )
    windows = stream.windows(TextPosition(), with_docs=True)
    w = 0  # index of the next window of the stream
    for s in todo:
        first, last = s * sw, min((s + 1) * sw, n_windows)
        wins, docs, ended = [], [], False
        while w < last:
            window, pos, doc = next(windows)
            if pos.epoch > 0:  # the corpus ended: the cache is shorter than asked
                ended = True
                break
            if w >= first:
                wins.append(window)
                docs.append(doc)
            w += 1
        if wins:
            wt, dt = torch.stack(wins), torch.stack(docs)  # [W, T]
            xs, ys = [], []
            for i in range(0, len(wt), data.batch_windows):  # the forward batches of online generation
                x, y = window_activations(subject, wt[i : i + data.batch_windows])
                xs.append(x)
                ys.append(y)
                bar.update(x.shape[0])
            write_shard(root, s, first, wt, dt, torch.cat(xs), torch.cat(ys), c.dtype)
        if ended:
            write_atomic(root / "end.json", json.dumps({"n_windows": w}))
            print(f"the corpus ended after {w} windows ({w * per} tokens), before cache.tokens={c.tokens}")
            break
    bar.close()
    return finalize(root, required=False)


def _end(root: Path) -> int | None:
    path = root / "end.json"
    return json.loads(path.read_text())["n_windows"] if path.exists() else None


# ---------------------------------------------------------------------------------------------
# The manifest


def finalize(root: str | os.PathLike, required: bool = True, verify: bool = False) -> dict | None:
    """Write `manifest.json` from the plan and every shard's sidecar (a merge of array tasks).
    Missing shards: None, or with `required` an error naming them. `verify`: check every checksum."""
    root = Path(root)
    if not (root / "plan.json").exists():
        raise CacheError(
            f"{root} is not an activation cache (no plan.json); write one with python -m clt.cache"
        )
    plan = json.loads((root / "plan.json").read_text())
    sw, n_windows = plan["shard_windows"], plan["n_windows"]
    end = _end(root)
    if end is not None:
        n_windows = min(n_windows, end)
    n_shards = -(-n_windows // sw)
    missing = [s for s in range(n_shards) if not sidecar_path(root, s).exists()]
    if missing:
        if required:
            raise CacheError(
                f"{root}: {len(missing)} of {n_shards} shards are missing ({_ranges(missing)}); "
                "run the generation tasks that write them (python -m clt.cache with the same "
                "settings resumes)"
            )
        return None
    metas = [json.loads(sidecar_path(root, s).read_text()) for s in range(n_shards)]
    if verify:
        bad = [s for s in range(n_shards) if not shard_ok(root, s, verify=True)]
        if bad:
            raise CacheError(
                f"{root}: shards {_ranges(bad)} are damaged (size or sha256 differs from their "
                "sidecar); run python -m clt.cache with the cache's settings to regenerate them"
            )
    tokens = sum(m["tokens"] for m in metas)
    L, d = plan["subject"]["n_layers"], plan["subject"]["d_model"]
    x_norm = [sum(m["x_norm_sum"][i] for m in metas) / tokens for i in range(L)]
    y_norm = [sum(m["y_norm_sum"][i] for m in metas) / tokens for i in range(L)]
    y_mean = sum(_tensor(shard_path(root, s), "y_sum") for s in range(n_shards)) / tokens  # [L, d]
    y_var = [sum(m["y_sq_sum"][i] for m in metas) / tokens - y_mean[i].pow(2).sum().item() for i in range(L)]
    with atomic_file(root / "stats.safetensors") as tmp:
        save_file({"y_mean": y_mean.contiguous()}, str(tmp))
    manifest = {
        **plan,
        "n_windows": n_windows,
        "n_shards": n_shards,
        "tokens": tokens,
        "documents": metas[-1]["docs"][1] + 1,
        "shards": [
            {
                "file": shard_path(root, m["index"]).name,
                "windows": m["windows"],
                "tokens": m["tokens"],
                "sha256": m["sha256"],
                "bytes": m["bytes"],
            }
            for m in metas
        ],
        "normalisation": {
            "x_norm_mean": x_norm,
            "y_norm_mean": y_norm,
            "input_scale": [math.sqrt(d) / max(v, 1e-8) for v in x_norm],
            "output_scale": [math.sqrt(d) / max(v, 1e-8) for v in y_norm],
            "y_variance": y_var,
            "y_mean_file": "stats.safetensors",
        },
    }
    write_atomic(root / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


def _tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(f"{xs[i]}" if i == j else f"{xs[i]}–{xs[j]}")
        i = j + 1
    return ", ".join(out)


def read_manifest(root: str | os.PathLike) -> dict:
    root = Path(root)
    path = root / "manifest.json"
    if not path.exists():
        if (root / "plan.json").exists():
            finalize(root, required=True)  # says which shards are missing, or completes the merge
            return json.loads(path.read_text())
        raise CacheError(
            f"data.cache={str(root)!r} is not an activation cache (no manifest.json); write "
            "one with python -m clt.cache cache.dir=…"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path}: cache format {manifest.get('format')!r}, this version reads {FORMAT}")
    return manifest


def check_compatible(manifest: dict, model: ModelConfig, subject=None, root: str = "") -> None:
    """The cache must hold activations of this run's subject model at this run's hooks."""
    s, h = manifest["subject"], manifest["hooks"]
    where = f"data.cache={root!r} holds activations of {_describe(manifest)}"
    if s["name_or_path"] != model.name_or_path or s.get("revision") != model.revision:
        raise CacheError(
            f"{where}; this run's subject model is {model.name_or_path!r} "
            f"(model.name_or_path, revision {model.revision!r}): use a cache of this model"
        )
    if h["input"] != model.input_hook or h["output"] != model.output_hook:
        raise CacheError(
            f"{where}; this run reads {model.input_hook} → {model.output_hook} "
            "(model.input_hook / model.output_hook): use a cache made at these hooks"
        )
    if subject is not None and (s["n_layers"], s["d_model"]) != (subject.n_layers, subject.d_model):
        raise CacheError(
            f"{where}; the subject model loaded has {subject.n_layers} layers × "
            f"d={subject.d_model}: the cache does not match it (mismatched L or d)"
        )


# ---------------------------------------------------------------------------------------------
# Reading


class CachedActivations:
    """The training source over a cache (same interface as `ActivationSource`): batches
    (x, y: [batch_tokens, L, d], position) in "stream" order (exactly the online batches) or "global"
    order (shards in a new random order every pass, `buffer_tokens` worth of shards mixed at a time:
    bounded memory). Data-parallel replicas read the same blocks and each takes its slice of every
    global batch, so a resume is exact whatever the number of replicas."""

    def __init__(
        self, subject, cfg: DataConfig, batch_tokens: int, seed: int = 0, model: ModelConfig | None = None
    ):
        self.root = Path(cfg.cache or "")
        self.manifest = m = read_manifest(self.root)
        if model is not None:
            check_compatible(m, model, subject, str(self.root))
        self.subject, self.cfg, self.seed = subject, cfg, seed
        self.batch_tokens, self.replica, self.n_replicas = batch_tokens, 0, 1
        self.dtype = getattr(torch, "float32" if cfg.buffer_dtype == "auto" else cfg.buffer_dtype)
        self.per, self.sw, self.n_windows = m["window_tokens"], m["shard_windows"], m["n_windows"]
        if m["tokens"] < batch_tokens:
            raise CacheError(
                f"data.cache={str(self.root)!r} holds {m['tokens']} tokens, fewer than one "
                f"batch (trainer.batch_tokens={batch_tokens})"
            )
        self.verified: set[int] = set()
        self.loaded: dict[
            int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}  # the last shards read (at most 2 kept)

    def text_config(self) -> dict:
        """The text settings the cache was made with (they replace the run's data.* text keys)."""
        return dict(self.manifest["text"])

    def split_for_replica(self, replica: int, n_replicas: int, global_batch: int) -> None:
        self.replica, self.n_replicas, self.batch_tokens = replica, n_replicas, global_batch

    def close(self) -> None:
        """(Nothing runs in the background: shards are read on demand.)"""

    # -- shards ------------------------------------------------------------------------------------
    def load_shard(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Shard s as (x, y: [n, L, d] in the buffer dtype, tokens [n] int64), checked against the
        manifest (size always; sha256 the first time when data.cache_verify)."""
        if s in self.loaded:
            return self.loaded[s]
        t = self.shard_tensors(s)
        out = (t["x"].to(self.dtype), t["y"].to(self.dtype), t["tokens"].long())
        if len(self.loaded) >= 2:
            self.loaded.pop(next(iter(self.loaded)))
        self.loaded[s] = out
        return out

    def shard_tensors(self, s: int) -> dict[str, torch.Tensor]:
        """Shard s as stored (x, y dequantised; tokens, docs), checked against the manifest (size
        always; sha256 the first time when data.cache_verify)."""
        entry, path = self.manifest["shards"][s], self.root / "shards" / self.manifest["shards"][s]["file"]
        fix = (
            f"regenerate it: python -m clt.cache cache.dir={self.root} with the cache's settings "
            "(only damaged shards are rewritten)"
        )
        if not path.exists():
            raise CacheError(f"{path} is missing; {fix}")
        if path.stat().st_size != entry["bytes"]:
            raise CacheError(
                f"{path} is truncated or damaged: {path.stat().st_size} bytes, the manifest "
                f"says {entry['bytes']}; {fix}"
            )
        if self.cfg.cache_verify and s not in self.verified:
            got = sha256(path)
            if got != entry["sha256"]:
                raise CacheError(
                    f"{path} is corrupted: sha256 {got[:12]}…, the manifest says "
                    f"{entry['sha256'][:12]}…; {fix}"
                )
            self.verified.add(s)
        try:
            t = load_file(str(path))
        except Exception as e:
            raise CacheError(f"{path} is unreadable ({e}); {fix}") from e
        if "x_q" in t:
            t["x"], t["y"] = (
                dequantize(t.pop("x_q"), t.pop("x_scale")),
                dequantize(t.pop("y_q"), t.pop("y_scale")),
            )
        return t

    def window_rows(self, w0: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows [w0, w0 + n) of the stream (wrapping around the cache) -> x, y [n·(T−1), L, d],
        tokens [n·(T−1)]."""
        parts, w = [], w0
        while w < w0 + n:
            i = w % self.n_windows
            s, r = divmod(i, self.sw)
            take = min(w0 + n - w, self.manifest["shards"][s]["windows"] - r)
            x, y, tok = self.load_shard(s)
            sl = slice(r * self.per, (r + take) * self.per)
            parts.append((x[sl], y[sl], tok[sl]))
            w += take
        return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]

    # -- the source interface ----------------------------------------------------------------------
    def eval_windows(self) -> torch.Tensor:
        return load_file(str(self.root / "eval.safetensors"))["windows"]

    def activations(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """windows: [B, T] -> x, y: [B·(T−1), L, d] from the subject model (for evaluation)."""
        return window_activations(self.subject, windows, self.dtype)

    def first_activations(self, n_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first windows of the stream, as online (`ActivationSource.first_activations`)."""
        n = min(n_batches * self.cfg.batch_windows, self.n_windows)
        x, y, _ = self.window_rows(0, n)
        return x, y

    def blocks(self, start: dict | None = None) -> Iterator[tuple]:
        """Yield (epoch, block, x, y, tok, perm) for every shuffle block from `start` on."""
        pos = (start or {}).get("cache", {"epoch": 0, "block": 0})
        epoch, block = pos["epoch"], pos["block"]
        if self.cfg.cache_order == "stream":
            wb = -(-self.cfg.buffer_tokens // self.per)  # windows per block, as online
            while True:
                x, y, tok = self.window_rows(block * wb, wb)
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + block)
                yield 0, block, x, y, tok, torch.randperm(x.shape[0], generator=g)
                block += 1
        n_shards = self.manifest["n_shards"]
        group = max(1, -(-self.cfg.buffer_tokens // (self.sw * self.per)))  # shards mixed at a time
        while True:
            order = torch.randperm(
                n_shards, generator=torch.Generator().manual_seed(self.seed * 7_919 + epoch)
            )
            while block * group < n_shards:
                parts = [self.load_shard(int(s)) for s in order[block * group : (block + 1) * group]]
                x, y, tok = (torch.cat(p) for p in zip(*parts))
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 65_537 + block)
                yield epoch, block, x, y, tok, torch.randperm(x.shape[0], generator=g)
                block += 1
            epoch, block = epoch + 1, 0

    def batches(self, start: dict | None = None, tokens: bool = False) -> Iterator[tuple]:
        """Yield (x, y: [batch_tokens / replicas, L, d], position after this batch as a dict) forever
        (with `tokens`, the token ids [batch_tokens / replicas] before the position)."""
        skip = (start or {}).get("cache", {}).get("batch", 0)
        B = self.batch_tokens
        lo, hi = self.replica * B // self.n_replicas, (self.replica + 1) * B // self.n_replicas
        for epoch, block, x, y, tok, perm in self.blocks(start):
            n_batches = x.shape[0] // B
            for j in range(skip, n_batches):
                idx = perm[j * B : (j + 1) * B][lo:hi]
                nxt = (
                    {"epoch": epoch, "block": block + 1, "batch": 0}
                    if j + 1 == n_batches
                    else {"epoch": epoch, "block": block, "batch": j + 1}
                )
                yield (
                    (x[idx], y[idx], tok[idx], {"cache": nxt}) if tokens else (x[idx], y[idx], {"cache": nxt})
                )
            skip = 0
