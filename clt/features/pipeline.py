"""Feature cards for a trained CLT: one streaming pass over N tokens (an activation cache, or the
subject model online), then the weight-only parts, then the store (docs/DESIGN.md §8).

    windows of the text (cache shards, or WindowStream + the subject's forward pass)
      → x [n, L, d] per batch of whole windows → a_l = σ(enc_l(x_l)) [n, F] one layer at a time
      → CardAccumulator (bounded memory: nothing of size tokens × features is kept)
      → resume points (<store>.work/task-i-of-n.pt, atomic) → merged over array tasks
      → cards: statistics, examples, logit effects, decoder norms, virtual-weight neighbours
      → the store (store.py), written atomically
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig, FeaturesConfig, FeaturesJobConfig, ModelConfig
from ..files import atomic_file
from ..model import CheckpointError, CrossLayerTranscoder
from . import weights as W
from .accumulate import N_STRATA, CardAccumulator, display_histogram, quantiles
from .store import FeatureError, FeatureStore, cantor, clt_checksum, encode_record, write_store

STORE_NAME = "features"


# ---------------------------------------------------------------------------------------------
# Where the store of a checkpoint lives


def default_store_dir(checkpoint: str | os.PathLike) -> Path:
    """<run dir>/features for a training run dir, <dir>/features for a native or circuit-tracer
    directory (next to the weights)."""
    p = Path(checkpoint)
    if p.name == "clt" and (p.parent / "config.json").exists() and (p.parent / "clt").is_dir():
        return p.parent / STORE_NAME
    return p / STORE_NAME


def find_store(checkpoint: str, **hub) -> Path | None:
    """The store of a checkpoint, if it has one: next to a local CLT, or the `features/` folder of
    its Hub repo (downloaded into huggingface_hub's cache)."""
    p = Path(checkpoint)
    if p.exists():
        d = default_store_dir(p)
        return d if (d / "manifest.json").exists() else None
    from ..hub import looks_like_repo_id

    if not looks_like_repo_id(checkpoint):
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    kw = {k: v for k, v in hub.items() if k in ("revision", "cache_dir", "local_files_only", "token")}
    try:
        manifest = Path(hf_hub_download(checkpoint, f"{STORE_NAME}/manifest.json", **kw))
        for name in json.loads(manifest.read_text())["files"]:
            if name != "manifest.json":
                hf_hub_download(checkpoint, f"{STORE_NAME}/{name}", **kw)
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return None
    return manifest.parent


# ---------------------------------------------------------------------------------------------
# What a pass reads: batches of whole windows, from a cache or online


@dataclass
class Batch:
    w0: int  # first window of the batch
    x: torch.Tensor  # [n, L, d] CLT inputs, n = windows · per
    tokens: torch.Tensor  # [n] token ids
    docs: torch.Tensor  # [n] document of every token
    resume: dict  # where the next batch starts


class CacheSource:
    """Windows of an activation cache (python -m clt.cache): no subject forward pass."""

    def __init__(self, data: DataConfig, model: ModelConfig, clt: CrossLayerTranscoder):
        from ..data.activation_cache import CachedActivations, CacheError, check_compatible

        self.reader = CachedActivations(None, data, 1)
        m = self.reader.manifest
        check_compatible(m, model, None, str(data.cache))
        if (m["subject"]["n_layers"], m["subject"]["d_model"]) != (clt.n_layers, clt.arch.d_model):
            raise CacheError(
                f"data.cache={data.cache!r} holds {m['subject']['n_layers']} layers × "
                f"d={m['subject']['d_model']}, the CLT reads {clt.n_layers} × d={clt.arch.d_model}"
            )
        self.per, self.available = m["window_tokens"], m["n_windows"]
        self.text = {
            "cache": str(Path(str(data.cache)).resolve()),
            "cache_tokens": m["tokens"],
            "cache_shards_sha256": [s["sha256"][:16] for s in m["shards"]],
            **m["text"],
        }
        self._last: tuple[int, dict] | None = None

    def _shard(self, s: int) -> dict:
        if self._last is None or self._last[0] != s:
            self._last = (s, self.reader.shard_tensors(s))
        return self._last[1]

    def batches(self, lo: int, hi: int, bw: int, resume: dict | None):
        w = resume["window"] if resume else lo
        while w < hi:
            n = min(bw, hi - w)
            xs, toks, docs = [], [], []
            for v in range(w, w + n):  # whole windows, shard by shard
                s, r = divmod(v, self.reader.sw)
                t, sl = self._shard(s), slice(r * self.per, (r + 1) * self.per)
                xs.append(t["x"][sl])
                toks.append(t["tokens"][sl].long())
                docs.append(t["docs"][sl].long())
            yield Batch(w, torch.cat(xs), torch.cat(toks), torch.cat(docs), {"window": w + n})
            w += n


class OnlineSource:
    """Windows of the text stream through the subject model (the training stream's order)."""

    def __init__(self, data: DataConfig, subject):
        from ..data.text import WindowStream

        self.subject, self.data = subject, data
        self.stream = WindowStream(data, subject.tokenizer)
        self.per, self.available = data.context_size - 1, None
        self.text = {
            k: v
            for k, v in asdict(data).items()
            if k
            not in (
                "cache",
                "cache_order",
                "cache_verify",
                "buffer_tokens",
                "buffer_dtype",
                "norm_batches",
                "streaming",
            )
        }

    def batches(self, lo: int, hi: int, bw: int, resume: dict | None):
        from ..data.stream import window_activations
        from ..data.text import TextPosition

        w = resume["window"] if resume else 0
        windows = self.stream.windows(
            TextPosition.from_dict(resume["text"]) if resume else TextPosition(), with_docs=True
        )
        while w < lo:  # an array task's share starts later: tokenise, no forward pass
            _, pos, _ = next(windows)
            if pos.epoch > 0:
                return
            w += 1
        while w < hi:
            wins: list[torch.Tensor] = []
            docs: list[torch.Tensor] = []
            ended, pos = False, None
            while len(wins) < min(bw, hi - w):
                window, pos, doc = next(windows)
                if pos.epoch > 0:
                    ended = True
                    break
                wins.append(window)
                docs.append(doc)
            if wins:
                wt = torch.stack(wins)
                x, _ = window_activations(self.subject, wt)
                yield Batch(
                    w,
                    x,
                    wt[:, 1:].reshape(-1),
                    torch.stack(docs)[:, 1:].reshape(-1),
                    {"window": w + len(wins), "text": pos.to_dict()},
                )
                w += len(wins)
            if ended:
                return


# ---------------------------------------------------------------------------------------------
# The pass


def counted_positions(clt: CrossLayerTranscoder, x: torch.Tensor, outlier_norm: float) -> torch.Tensor | None:
    """x: [n, L, d] -> [n] bool: False where the input norm at some layer exceeds `outlier_norm` ×
    that layer's mean norm (√d / input_scale, the training estimate); None when off."""
    if outlier_norm <= 0:
        return None
    mean = clt.arch.d_model**0.5 / clt.input_scale.float()  # [L]
    return (x.float().norm(dim=-1) <= outlier_norm * mean.to(x.device)).all(-1)


def accumulator(clt: CrossLayerTranscoder, f: FeaturesConfig, features=None, device="cpu") -> CardAccumulator:
    return CardAccumulator(
        clt.n_layers, clt.d_sae, f.top_k, f.stratum_samples, f.context_left, f.context_right, features, device
    )


@torch.no_grad()
def scan_batch(
    acc: CardAccumulator,
    clt: CrossLayerTranscoder,
    b: Batch,
    per: int,
    outlier_norm: float,
    max_elements: int = 1 << 26,
) -> None:
    """Encode one batch layer by layer and add it to the statistics, several layers per update
    (at most `max_elements` activations held at a time)."""
    dev = acc.hist.device
    x = b.x.to(dev)
    tokens, docs = b.tokens.to(dev), b.docs.to(dev)
    counted = counted_positions(clt, x, outlier_norm)
    g0, first, n, F = b.w0 * per, 0, len(tokens), clt.d_sae
    while first < clt.n_layers:
        # the layers first … last − 1 together: at most max_elements activations
        last = first + 1
        while last < clt.n_layers and sum(acc.widths[first : last + 1]) * n <= max_elements:
            last += 1
        dense = all(acc.features[layer] is None for layer in range(first, last))
        # all features of every layer: one [layers, n, F] buffer (one gather per context batch)
        buf = acc.scratch_buffer((last - first, n, F), clt.W_enc.dtype) if dense else None
        group, entries = [], []
        for i, layer in enumerate(range(first, last)):
            a, nz = clt.encode_layer_entries(x[:, layer], layer, None if buf is None else buf[i])
            sel = acc.features[layer]
            if sel is not None:  # the selected features only: their non-zeros from a scan
                a = a[:, sel.to(dev)]
                t, j = (a > 0).nonzero(as_tuple=True)
                nz = (t, j, a[t, j])
            group.append(a)
            entries.append(nz)
        acc.update(first, group if buf is None else buf, tokens, docs, g0, per, counted, entries)
        first = last
    acc.add_tokens(len(tokens) if counted is None else int(counted.sum()))


def _signature(clt_sum: str, text: dict, f: FeaturesConfig, per: int, n_windows: int, features) -> dict:
    keep = ("top_k", "context_left", "context_right", "stratum_samples", "outlier_norm")
    sel = None if features is None else [None if s is None else s.tolist() for s in features]
    return {
        "clt": clt_sum,
        "text": text,
        "per": per,
        "n_windows": n_windows,
        **{k: getattr(f, k) for k in keep},
        "features": sel,
    }


def run_pass(
    clt: CrossLayerTranscoder,
    source,
    f: FeaturesConfig,
    work: Path,
    clt_sum: str,
    task: int = 0,
    tasks: int = 1,
    features=None,
    device="cpu",
    progress: bool = True,
    config: dict | None = None,
) -> Path:
    """Scan this task's share of the windows, saving resume points to `work`; returns the task's
    finished state file (with `config`, the job that wrote it, for `merge`)."""
    from tqdm import tqdm

    per = source.per
    n_windows = -(-f.tokens // per)
    if source.available is not None:
        n_windows = min(n_windows, source.available)
    lo, hi = task * n_windows // tasks, (task + 1) * n_windows // tasks
    sig = _signature(clt_sum, source.text, f, per, n_windows, features)
    path = work / f"task-{task:03d}-of-{tasks:03d}.pt"
    acc = accumulator(clt, f, features, device)
    resume = None
    if path.exists():
        saved = torch.load(path, map_location=device, weights_only=False)
        if saved["signature"] != sig:
            raise FeatureError(
                f"{work} holds an unfinished pass with other settings (another CLT, text, token "
                f"count or card settings); remove {work} to start over, or run with its settings"
            )
        if saved["done"]:
            return path
        acc.load(saved["acc"])
        resume = saved["resume"]
        print(f"resuming task {task}/{tasks} at window {resume['window']} of [{lo}, {hi})")
    work.mkdir(parents=True, exist_ok=True)

    def save(done: bool, where: dict | None) -> None:
        with atomic_file(path) as tmp:
            torch.save(
                {"signature": sig, "done": done, "resume": where, "acc": acc.state(), "config": config}, tmp
            )

    start = resume["window"] if resume else lo
    bar = tqdm(
        total=(hi - lo) * per,
        initial=(start - lo) * per,
        unit="tok",
        unit_scale=True,
        desc=f"features task {task}/{tasks}",
        disable=not progress,
    )
    since, t0, where = 0, time.perf_counter(), resume
    delay = float(os.environ.get("CLT_FEATURES_BATCH_DELAY", 0))  # seconds per batch: for interruption tests
    for b in source.batches(lo, hi, f.batch_windows, resume):
        scan_batch(acc, clt, b, per, f.outlier_norm)
        if delay:
            time.sleep(delay)
        bar.update(len(b.tokens))
        where = b.resume
        since += len(b.tokens) // per
        if since >= f.save_every:
            save(False, where)
            since = 0
    bar.close()
    if acc.n_tokens == 0 and hi > lo:
        raise FeatureError("no tokens were scanned: the text (or cache) is empty")
    save(True, where)
    if progress and hi > lo:
        dt = time.perf_counter() - t0
        print(
            f"task {task}/{tasks}: {acc.n_tokens} tokens in {dt:.1f} s "
            f"({acc.n_tokens / max(dt, 1e-9):,.0f} tok/s), "
            f"state {acc.memory_bytes() / 2**20:.1f} MiB"
        )
    return path


def job_of_work(work: str | os.PathLike) -> FeaturesJobConfig:
    """The job an array's tasks ran (from their state files in `work`), as task 0 of them: running
    it merges their states and writes the store."""
    from omegaconf import OmegaConf

    from ..config import load_config

    files = sorted(Path(work).glob("task-*-of-*.pt"))
    if not files:
        raise FeatureError(
            f"{work} holds no task states (task-*-of-*.pt): not the work directory of a features job"
        )
    saved = torch.load(files[0], map_location="cpu", weights_only=False)
    if not saved.get("config"):
        raise FeatureError(f"{files[0]} does not record its job; run the tasks' command again to finish")
    cfg = saved["config"]
    cfg["features"] |= {"task": 0, "tasks": int(files[0].stem.split("-of-")[1])}
    return load_config(OmegaConf.create(cfg), FeaturesJobConfig)


def merge_tasks(
    clt: CrossLayerTranscoder, f: FeaturesConfig, work: Path, tasks: int, features=None, device="cpu"
) -> CardAccumulator | None:
    """Every task's finished state merged (None while some task is not finished)."""
    paths = [work / f"task-{i:03d}-of-{tasks:03d}.pt" for i in range(tasks)]
    states = []
    for p in paths:
        try:
            s = torch.load(p, map_location=device, weights_only=False)
        except FileNotFoundError:  # not started, or merged by another task already
            return None
        if not s["done"]:
            return None
        states.append(s)
    sigs = {json.dumps(s["signature"], sort_keys=True) for s in states}
    if len(sigs) > 1:
        raise FeatureError(
            f"the tasks in {work} were run with different settings; remove {work} and run them again"
        )
    acc = accumulator(clt, f, features, device)
    acc.load(states[0]["acc"])
    for s in states[1:]:
        other = accumulator(clt, f, features, device)
        other.load(s["acc"])
        acc.merge(other)
    return acc


# ---------------------------------------------------------------------------------------------
# From the statistics to cards


class TokenText:
    """Token id -> display string (decoded alone; newlines as ⏎, tabs as →), memoised."""

    def __init__(self, tokenizer):
        self.tok, self.memo = tokenizer, {}

    def __call__(self, i: int) -> str:
        s = self.memo.get(i)
        if s is None:
            s = self.tok.decode([int(i)]) if self.tok is not None else f"<{i}>"
            s = self.memo[i] = s.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")
        return s


def _examples(entries, rows, left: int, text: TokenText) -> list[list[dict]]:
    """Examples of the slot entries of `rows` ([r] rows of a SlotBuffer): per row, its filled slots."""
    out = []
    for r in rows:
        ex = []
        for s in range(entries.idx.shape[1]):
            if entries.idx[r, s] < 0:
                continue
            tok, act = entries.tok[r, s], entries.act[r, s].float()
            ok = tok >= 0
            ids = tok[ok].tolist()
            acts = act[ok].tolist()
            peak = left - int((~ok[:left]).sum())
            acts[peak] = float(entries.val[r, s])
            ex.append(
                {
                    "tokens": [text(i) for i in ids],
                    "tokens_acts_list": acts,
                    "train_token_ind": peak,
                    "is_repeated_datapoint": False,
                    "token_ids": ids,
                    "token_index": int(entries.idx[r, s]),
                    "document": int(entries.doc[r, s]),
                }
            )
        out.append(ex)
    return out


@torch.no_grad()
def card_records(
    acc: CardAccumulator,
    clt: CrossLayerTranscoder,
    lm,
    tokenizer,
    f: FeaturesConfig,
    transcoder_id: str,
    progress: bool = True,
):
    """A function layer -> iterator of (feature, record bytes | None) over all d_sae features (None
    for features without a card: not selected). `clt` folded; `lm`: the subject's causal LM."""
    from tqdm import tqdm

    text = TokenText(tokenizer)
    W_U = lm.get_output_embeddings().weight.detach().float().cpu()
    gamma, centre = W.final_norm(lm)
    clt = clt.cpu()
    t0 = time.perf_counter()
    down, up = W.virtual_weight_neighbours(
        clt, f.n_neighbours, [None if s is None else s.cpu() for s in acc.features]
    )
    if progress:
        print(f"virtual weights: {time.perf_counter() - t0:.1f} s")
    count, total = acc.count.cpu(), acc.total.cpu()
    vmax, vmin = acc.max.cpu(), acc.min.cpu()
    q = quantiles(acc.hist.cpu(), vmin, vmax)
    hist = display_histogram(acc.hist.cpu(), vmin, vmax)
    groups = display_histogram(acc.hist.cpu(), vmin, vmax, n_bins=f.intervals)
    top = _cpu(acc.top)
    strata = _cpu(acc.strata)
    n_tokens = acc.n_tokens
    bar = tqdm(total=acc.offsets[-1], unit="card", desc="cards", disable=not progress)

    def records(layer: int):
        ids = acc.feature_ids(layer).cpu()
        tv, ti, bv, bi = W.logit_effects(clt, W_U, gamma, centre, layer, ids, f.n_logits)
        norms = W.decoder_norms(clt, layer, ids)
        r0 = acc.offsets[layer]
        rows = list(range(r0, r0 + len(ids)))
        tops = _examples(top, rows, f.context_left, text)
        by_feature = dict(zip(ids.tolist(), range(len(ids))))
        for feature in range(clt.d_sae):
            j = by_feature.get(feature)
            if j is None:
                yield feature, None
                continue
            r = r0 + j
            c = int(count[r])
            mx = float(vmax[r])
            card: dict[str, Any] = {
                "transcoder_id": transcoder_id,
                "index": cantor(layer, feature),
                "layer": layer,
                "feature": feature,
                "dead": c == 0,
                "n_tokens": n_tokens,
                "count": c,
                "activation_frequency": c / max(n_tokens, 1),
                "act_min": 0.0,
                "act_max": mx,
                "mean_activation": float(total[r]) / c if c else 0.0,
                "min_activation": float(vmin[r]) if c else 0.0,
                "histogram": hist[r].tolist(),
                "quantile_values": q[r].tolist(),
                "log_histogram": acc.hist[r].tolist(),
                "top_logits": [text(i) for i in ti[j].tolist()],
                "top_logit_values": tv[j].tolist(),
                "top_logit_ids": ti[j].tolist(),
                "bottom_logits": [text(i) for i in bi[j].tolist()],
                "bottom_logit_values": bv[j].tolist(),
                "bottom_logit_ids": bi[j].tolist(),
                "decoder_norms": norms[j].tolist(),
                "downstream": _neighbours(down[layer], j),
                "upstream": _neighbours(up[layer], j),
                "examples_quantiles": [
                    {
                        "quantile_name": "Top",
                        "examples": tops[j],
                        "lo": 0.0,
                        "hi": mx,
                        "share": 1.0 if c else 0.0,
                    }
                ],
            }
            if c:
                card["examples_quantiles"] += _interval_groups(strata, r, mx, groups[r], c, f, text)
            bar.update(1)
            yield feature, encode_record(card)
        if layer == clt.n_layers - 1:
            bar.close()

    return records


def _cpu(buf):
    from .accumulate import SlotBuffer

    out = SlotBuffer.__new__(SlotBuffer)
    out.cap, out.dedup = buf.cap, buf.dedup
    for k in SlotBuffer.FIELDS:
        setattr(out, k, getattr(buf, k).cpu())
    return out


def _neighbours(nb, j: int) -> list[dict]:
    w, ly, ix = (t[j].tolist() for t in nb)
    return [{"layer": a, "feature": b, "weight": c} for c, a, b in zip(w, ly, ix) if a >= 0]


def _interval_groups(
    strata, r: int, vmax: float, counts: torch.Tensor, count: int, f: FeaturesConfig, text: TokenText
) -> list[dict]:
    """Equal-width intervals of [0, max] (top first), each with up to `interval_examples` of the
    feature's stratum samples that fall inside it (by sample priority: a uniform choice within each
    stratum) and its share of the non-zero activations (from the histogram)."""
    rows = list(range(r * N_STRATA, (r + 1) * N_STRATA))
    filled = strata.idx[rows] >= 0
    val, order = strata.val[rows][filled], strata.order[rows][filled]
    where = torch.nonzero(filled)
    width = vmax / f.intervals
    out = []
    for i in reversed(range(f.intervals)):
        lo, hi = i * width, (i + 1) * width
        inside = (val > lo) & ((val <= hi) | (i == f.intervals - 1))
        pick = torch.nonzero(inside).flatten()
        pick = pick[torch.argsort(order[pick], stable=True)][: f.interval_examples]
        examples = []
        for p in pick.tolist():
            s, slot = where[p].tolist()
            examples += _examples(_slot_view(strata, rows[s], slot), [0], f.context_left, text)[0]
        share = int(counts[i]) / count
        out.append(
            {
                "quantile_name": f"Interval {lo:.3g}–{hi:.3g} · {100 * share:.3g}%",
                "examples": examples,
                "lo": lo,
                "hi": hi,
                "share": share,
            }
        )
    return out


def _slot_view(buf, row: int, slot: int):
    from types import SimpleNamespace

    return SimpleNamespace(
        **{k: getattr(buf, k)[row : row + 1, slot : slot + 1] for k in ("idx", "val", "doc", "tok", "act")}
    )


# ---------------------------------------------------------------------------------------------
# The whole job


def load_checkpoint(checkpoint: str, device) -> CrossLayerTranscoder:
    from ..io import load_clt

    try:
        return load_clt(checkpoint, device)
    except CheckpointError as e:
        raise FeatureError(f"features.checkpoint={checkpoint!r} is not a CLT: {e}") from e


def subject_config(model: ModelConfig, clt: CrossLayerTranscoder) -> ModelConfig:
    name = model.name_or_path or clt.arch.subject_model
    if not name:
        raise FeatureError("the checkpoint does not name its subject model: pass model.name_or_path=…")
    return replace(model, name_or_path=name, input_hook=clt.arch.input_hook, output_hook=clt.arch.output_hook)


def check_existing(out: Path, checksum: str) -> FeatureStore | None:
    """The store at `out` if there is one for this CLT; an error if it is another CLT's."""
    if not (out / "manifest.json").exists():
        if out.exists() and any(out.iterdir()):
            raise FeatureError(
                f"features.out={str(out)!r} exists and is not a feature store: choose another directory"
            )
        return None
    store = FeatureStore(out)
    store.check(None, checksum)
    return store


def _same_settings(a: dict, b: dict) -> bool:
    skip = ("task", "tasks", "checkpoint", "out", "save_every", "batch_windows")
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def compute_store(
    job: FeaturesJobConfig,
    *,
    clt: CrossLayerTranscoder | None = None,
    subject=None,
    features: Sequence[torch.Tensor | None] | None = None,
    device: str | None = None,
    progress: bool = True,
) -> Path | None:
    """Run this task's pass and, once every task's is done, write the store. `features`: cards
    for these features only (merged into an existing store). Returns the store, or None while
    other tasks are still running."""
    from ..data.activation_cache import array_task
    from ..subject import load_subject

    f = job.features
    dev = device or (("cuda" if torch.cuda.is_available() else "cpu") if job.device == "auto" else job.device)
    clt = (clt or load_checkpoint(f.checkpoint, dev)).to(dev).eval()
    checksum = clt_checksum(clt)
    out = Path(f.out) if f.out else default_store_dir(f.checkpoint)
    if not Path(f.checkpoint).exists() and not f.out:
        raise FeatureError(
            f"{f.checkpoint} is a Hub repo: give the local store directory with features.out=DIR"
        )
    existing = check_existing(out, checksum)
    task, tasks = array_task(f, "features")
    if (
        existing is not None
        and features is None
        and existing.manifest.get("complete")
        and _same_settings(existing.manifest["settings"], asdict(f))
    ):
        if progress:
            print(f"{out}: the cards of this CLT with these settings are there already")
        return out
    if existing is not None and features is not None:  # only what is missing
        have = existing.present()
        missing = [
            (torch.arange(clt.d_sae) if s is None else s)[
                ~torch.isin(torch.arange(clt.d_sae) if s is None else s, have[l])
            ]
            for l, s in enumerate(features)
        ]
        features = missing
        if all(len(s) == 0 for s in missing):
            return out
    model = subject_config(job.model, clt)
    if subject is None:
        subject = load_subject(model, dev)
    source = CacheSource(job.data, model, clt) if job.data.cache else OnlineSource(job.data, subject)
    work = out.with_name(out.name + ".work")
    run_pass(clt, source, f, work, checksum, task, tasks, features, dev, progress, job.to_dict())
    with _merge_lock(work):  # array tasks finishing together: one merges, the others find it done
        acc = merge_tasks(clt, f, work, tasks, features, dev)
        if acc is None:
            return out if tasks > 1 and (out / "manifest.json").exists() and not work.exists() else None
        return _write(out, work, acc, clt, subject, f, source, model, checksum, tasks, existing, progress)


@contextlib.contextmanager
def _merge_lock(work: Path):
    import fcntl

    try:
        lock = open(work / ".merge.lock", "w")
    except FileNotFoundError:  # another task merged and removed the work directory
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write(out, work, acc, clt, subject, f, source, model, checksum, tasks, existing, progress) -> Path:
    records = card_records(
        acc, clt.folded(), subject.model, subject.tokenizer, f, str(f.checkpoint), progress
    )
    if existing is not None:  # keep its cards, add the new ones
        new = records
        have = existing.present()

        def records(layer):  # noqa: F811
            keep = set(have[layer].tolist())
            for feature, blob in new(layer):
                yield feature, (existing.raw(layer, feature) if feature in keep else blob)

    selected = [None if s is None else s.tolist() for s in acc.features]
    manifest = {
        "clt": {
            "checksum": checksum,
            "source": str(f.checkpoint),
            "n_layers": clt.n_layers,
            "d_sae": clt.d_sae,
            "activation": clt.arch.activation,
            "subject_model": clt.arch.subject_model,
        },
        "subject": model.name_or_path,
        "text": source.text,
        "n_tokens": acc.n_tokens,
        "window_tokens": source.per,
        "settings": asdict(f) | {"task": 0, "tasks": tasks},
        "complete": all(s is None for s in selected)
        or (existing is not None and existing.manifest.get("complete", False)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if existing is not None and existing.manifest["n_tokens"] != acc.n_tokens:
        raise FeatureError(
            f"the store {out} was computed over {existing.manifest['n_tokens']} tokens, these cards over "
            f"{acc.n_tokens}: use the store's settings (features.tokens, the same text)"
        )
    write_store(out, clt.n_layers, clt.d_sae, records, manifest)
    shutil.rmtree(work, ignore_errors=True)
    return out
