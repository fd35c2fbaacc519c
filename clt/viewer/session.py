"""The CLT and subject model behind the viewer, loaded once on first use: attribution of new
prompts (a background job with progress) and interventions (`ReplacementModel.intervene` and
`generate`). One model call at a time (a lock); the server's other threads keep serving."""

from __future__ import annotations

import itertools
import re
import threading
import time
import traceback
from typing import Any

import torch

from ..config import CLTError, ModelConfig
from .graphs import Conflict, GraphFolder, LoadedGraph, ViewerError


class ModelSession:
    def __init__(
        self,
        folder: GraphFolder,
        checkpoint: str | None = None,
        device: str = "auto",
        dtype: str = "float32",
        log=print,
    ):
        self.folder, self.checkpoint, self.dtype, self.log = folder, checkpoint, dtype, log
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.rm: Any = None  # the ReplacementModel, loaded on first use (`model()`)
        self.checksum = ""
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self.jobs: dict[str, dict] = {}
        self._ids = itertools.count(1)

    # -- the model -------------------------------------------------------------------------------
    def resolve_checkpoint(self) -> str:
        if self.checkpoint:
            return self.checkpoint
        from pathlib import Path

        for g in reversed(self.folder.listing()):  # newest first: the CLT that wrote the folder's graphs
            try:
                clt = self.folder.get(g["slug"]).graph.info.get("clt", "")
            except ViewerError:
                continue
            if clt and Path(clt).exists():
                return clt
        raise ViewerError(
            "no CLT to run: start the server with --clt CHECKPOINT (the folder's graphs do not name "
            "a local one)"
        )

    def model(self):
        with self._load_lock:
            if self.rm is None:
                from ..attribution import ReplacementModel
                from ..features.store import clt_checksum
                from ..io import load_clt
                from ..subject import load_subject

                ckpt = self.resolve_checkpoint()
                t0 = time.perf_counter()
                clt = load_clt(ckpt, self.device)
                arch = clt.arch
                if not arch.subject_model:
                    raise ViewerError(f"{ckpt} does not name its subject model")
                subject = load_subject(
                    ModelConfig(
                        name_or_path=arch.subject_model,
                        dtype=self.dtype,
                        input_hook=arch.input_hook,
                        output_hook=arch.output_hook,
                    ),
                    self.device,
                )
                self.rm = ReplacementModel(subject, clt)
                self.checksum = clt_checksum(clt)
                self.checkpoint = ckpt
                self.log(
                    f"loaded the CLT {ckpt} and the subject {arch.subject_model} "
                    f"({time.perf_counter() - t0:.1f} s)"
                )
            return self.rm

    def check_graph(self, g: LoadedGraph) -> None:
        """Refuse a graph made with another CLT (by the folded weights' checksum)."""
        self.model()
        theirs = g.graph.info.get("clt_checksum")
        if theirs and theirs != self.checksum:
            raise Conflict(
                f"graph {g.slug!r} was made with another CLT ({g.graph.info.get('clt', '?')}, weights "
                f"sha256 {theirs[:12]}…) than the one loaded ({self.checkpoint}, {self.checksum[:12]}…)"
            )

    # -- attribution jobs ------------------------------------------------------------------------
    def new_slug(self, prompt: str) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "graph"
        taken = {g["slug"] for g in self.folder.listing()} | {j["slug"] for j in self.jobs.values()}
        for i in itertools.count(1):
            slug = base if i == 1 else f"{base}-{i}"
            if slug not in taken:
                return slug
        raise AssertionError

    def start_attribution(self, body: dict) -> dict:
        from ..attribution.graph import check_slug

        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ViewerError("the prompt is empty")
        settings = {
            "max_n_logits": 10,
            "desired_logit_prob": 0.95,
            "max_feature_nodes": None,
            "batch_size": 64,
        }
        for key in settings:
            if body.get(key) is not None:
                settings[key] = body[key]
        rm = self.model()
        rm.tokenize(prompt)  # a prompt longer than the context fails now, not in the job
        try:
            slug = check_slug(body["slug"]) if body.get("slug") else self.new_slug(prompt)
        except CLTError as e:
            raise ViewerError(str(e)) from None
        job: dict[str, Any] = {
            "id": str(next(self._ids)),
            "slug": slug,
            "prompt": prompt,
            "state": "queued",
            "done": 0,
            "total": 0,
            "error": "",
            "seconds": 0.0,
        }
        self.jobs[job["id"]] = job
        threading.Thread(target=self._attribute, args=(job, settings), daemon=True).start()
        return job

    def _attribute(self, job: dict, settings: dict) -> None:
        from ..attribute import store_location
        from ..attribution import attribute, prune
        from ..attribution.graph import write_graph_files

        def progress(done: int, total: int) -> None:
            job["done"], job["total"] = done, total

        t0 = time.perf_counter()
        try:
            with self._run_lock:
                job["state"] = "running"
                rm = self.model()
                scan, _ = store_location(str(self.checkpoint), None)  # set by model()
                graph = attribute(
                    job["prompt"], rm.clt, rm, scan=scan, verbose=False, progress=progress, **settings
                )
                graph.info["clt"] = self.checkpoint
                graph.info["clt_checksum"] = self.checksum
                pruned = prune(graph, 0.8, 0.98)
                with self.folder.write_lock:
                    graph.to_pt(self.folder.root / f"{job['slug']}.pt")
                    write_graph_files(graph, pruned, self.folder.root, job["slug"], 0.8, 0.98)
            job["seconds"] = round(time.perf_counter() - t0, 3)
            job["state"] = "done"
            self.log(f"attributed {job['prompt']!r} -> {job['slug']} ({job['seconds']} s)")
        except CLTError as e:
            job["state"], job["error"] = "error", str(e)
            self.log(f"error: attribution of {job['prompt']!r}: {e}")
        except Exception as e:  # noqa: BLE001 (the job reports it; the server keeps serving)
            job["state"], job["error"] = "error", f"{type(e).__name__}: {e}"
            self.log(f"error: attribution of {job['prompt']!r} failed:\n{traceback.format_exc()}")

    def job(self, job_id: str) -> dict:
        if job_id not in self.jobs:
            from .graphs import NotFound

            raise NotFound(f"no job {job_id!r}")
        return self.jobs[job_id]

    # -- interventions ---------------------------------------------------------------------------
    def interventions(self, g: LoadedGraph, items) -> list:
        """[{"node": node_id} or {"layer", "position", "feature"}, with "value" and "op": set|scale}]
        -> Intervention list."""
        from ..attribution import Intervention

        if not isinstance(items, list) or not items:
            raise ViewerError("interventions must be a non-empty list")
        out = []
        for i, it in enumerate(items):
            if not isinstance(it, dict):
                raise ViewerError(f"interventions[{i}] must be an object")
            op = it.get("op", "set")
            if op not in ("set", "scale"):
                raise ViewerError(f"interventions[{i}].op must be 'set' or 'scale', got {op!r}")
            try:
                value = float(it.get("value", 0.0))
            except (TypeError, ValueError):
                raise ViewerError(f"interventions[{i}].value must be a number") from None
            if "node" in it:
                n = g.nodes[g.node_index(str(it["node"]))]
                if n["kind"] != "feature":
                    raise ViewerError(
                        f"interventions[{i}]: {it['node']} is a {n['kind']} node, not a feature"
                    )
                layer, pos, feat = n["layer"], n["pos"], n["feature"]
            else:
                try:
                    layer, pos, feat = int(it["layer"]), int(it["position"]), int(it["feature"])
                except (KeyError, TypeError, ValueError):
                    raise ViewerError(
                        f"interventions[{i}] needs a node id or integer layer, position and feature"
                    ) from None
            if not 0 <= pos < g.graph.n_pos:
                raise ViewerError(
                    f"interventions[{i}]: position {pos} is outside the prompt (0…{g.graph.n_pos - 1})"
                )
            out.append(Intervention(layer, pos, feat, value, op))
        return out

    def intervene(self, g: LoadedGraph, body: dict) -> dict:
        mode = body.get("mode", "constrained")
        if mode not in ("constrained", "free"):
            raise ViewerError(f"mode must be 'constrained' or 'free', got {mode!r}")
        n_new = body.get("max_new_tokens", 12)
        if not isinstance(n_new, int) or not 0 <= n_new <= 64:
            raise ViewerError("max_new_tokens must be an integer in 0…64")
        self.check_graph(g)
        ivs = self.interventions(g, body.get("interventions"))
        ids = g.graph.input_tokens
        with self._run_lock:
            rm = self.rm
            before = rm.intervene(ids, [], mode=mode)[-1]
            after = rm.intervene(ids, ivs, mode=mode)[-1]
            text = base_text = ""
            if n_new:
                base_text, _, _ = rm.generate(ids, [], max_new_tokens=n_new)
                text, _, _ = rm.generate(ids, ivs, max_new_tokens=n_new)
        tok = rm.subject.tokenizer

        def top(logits: torch.Tensor, k: int = 10) -> list[dict]:
            p = logits.softmax(-1)
            v, i = p.topk(k)
            return [
                {"token": tok.decode([j]), "id": j, "prob": float(pv), "logit": float(logits[j])}
                for pv, j in zip(v.tolist(), i.tolist())
            ]

        lp_b, lp_a = before.log_softmax(-1), after.log_softmax(-1)
        delta = lp_a - lp_b
        changed = delta.abs().topk(10).indices.tolist()
        return {
            "mode": mode,
            "before": top(before),
            "after": top(after),
            "changed": [
                {
                    "token": tok.decode([j]),
                    "id": j,
                    "before": float(lp_b[j].exp()),
                    "after": float(lp_a[j].exp()),
                    "delta_logprob": float(delta[j]),
                }
                for j in changed
            ],
            "continuation": text,
            "baseline_continuation": base_text,
            "interventions": [
                {
                    "layer": iv.layer,
                    "position": iv.position,
                    "feature": iv.feature,
                    "value": iv.value,
                    "op": iv.mode,
                }
                for iv in ivs
            ],
        }
