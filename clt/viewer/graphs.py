"""The viewer's data: the graphs of a folder, pruned views, binary edges, neighbours, paths and
the scores of a pinned subgraph. Everything is computed from `{slug}.pt` (the full graph), so the
sliders re-prune nodes *and* edges (`clt.attribution.prune`), and the browser never receives the
dense adjacency.

A view at thresholds (t_node, t_edge) is exactly `prune(graph, t_node, t_edge)`:
    nodes = node_mask (graph order), edges = edge_mask (targets × sources, between kept nodes).
Edges travel as one binary blob (little-endian):
    b"CLTE" | uint32 n | int32 src[n] | int32 dst[n] | float32 weight[n]      (12 B per edge)
src/dst index the view's node list; weight is A[dst, src] (the direct effect, docs/DESIGN.md §6).
"""

from __future__ import annotations

import heapq
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attribution.graph import (
    Graph,
    Pruned,
    check_slug,
    graph_scores,
    json_nodes,
    normalize_matrix,
    prune,
    pruned_adjacency,
    scores,
)
from ..config import CLTError
from ..errors import BadGraph, Conflict, NotFound, ViewerError  # noqa: F401 (re-exported)

EDGE_MAGIC = b"CLTE"


def thresholds(query: dict, default_node: float = 0.8, default_edge: float = 0.98) -> tuple[float, float]:
    """(node_threshold, edge_threshold) from a query, each in (0, 1]."""
    out = []
    for key, default in (("node_threshold", default_node), ("edge_threshold", default_edge)):
        raw = query.get(key, default)
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise ViewerError(f"{key} must be a number in (0, 1], got {raw!r}") from None
        if not 0.0 < v <= 1.0:
            raise ViewerError(f"{key} must be in (0, 1], got {v}")
        out.append(round(v, 6))
    return out[0], out[1]


def _kind(feature_type: str) -> str:
    return {
        "cross layer transcoder": "feature",
        "mlp reconstruction error": "error",
        "embedding": "embedding",
        "logit": "logit",
    }[feature_type]


@dataclass
class View:
    node_threshold: float
    edge_threshold: float
    pruned: Pruned
    index: torch.Tensor  # [n] graph node index of each view node (ascending)
    src: np.ndarray  # [E] int32 view indices
    dst: np.ndarray  # [E] int32
    weight: np.ndarray  # [E] float32 A[dst, src]
    scores: dict

    def edges_blob(self) -> bytes:
        n = len(self.src)
        return b"".join(
            [
                EDGE_MAGIC,
                np.uint32(n).astype("<u4").tobytes(),
                self.src.astype("<i4").tobytes(),
                self.dst.astype("<i4").tobytes(),
                self.weight.astype("<f4").tobytes(),
            ]
        )


class LoadedGraph:
    """One `{slug}.pt` with its node table and a small cache of views."""

    def __init__(self, slug: str, graph: Graph, mtime: int):
        self.slug, self.graph, self.mtime = slug, graph, mtime
        self._views: OrderedDict[tuple[float, float], View] = OrderedDict()
        self._lock = threading.Lock()
        # influence does not depend on the thresholds; this pruning is also the view at (1, 1)
        self._full = base = prune(graph, 1.0, 1.0)
        every = replace(base, node_mask=torch.ones_like(base.node_mask))
        L = graph.n_layers
        self.nodes: list[dict] = []
        for i, n in json_nodes(graph, every).items():
            kind = _kind(n["feature_type"])
            layer = -1 if kind == "embedding" else (L if kind == "logit" else int(n["layer"]))
            feat = graph.feature_of(i)[2] if kind == "feature" else (-1 if kind == "error" else n["feature"])
            token = (
                graph.logit_token_strings[i - graph.logit_slice.start]
                if kind == "logit"
                else graph.token_strings[n["ctx_idx"]]
            )
            self.nodes.append(
                {
                    "id": n["node_id"],
                    "kind": kind,
                    "layer": layer,
                    "pos": n["ctx_idx"],
                    "feature": feat,
                    "cantor": n["feature"] if kind == "feature" else None,
                    "activation": n["activation"],
                    "influence": n["influence"],
                    "prob": n["token_prob"] if kind == "logit" else None,
                    "token": token,
                    "label": n["clerp"],
                }
            )
        self.id_to_index = {n["id"]: i for i, n in enumerate(self.nodes)}
        self.A_hat: torch.Tensor | None = (
            None  # row-normalised |A|, for path strengths (computed on first use)
        )

    # -- views -----------------------------------------------------------------------------------
    def view(self, node_threshold: float, edge_threshold: float) -> View:
        key = (node_threshold, edge_threshold)
        with self._lock:
            if key in self._views:
                self._views.move_to_end(key)
                return self._views[key]
        g = self.graph
        p = self._full if key == (1.0, 1.0) else prune(g, node_threshold, edge_threshold)
        index = p.node_mask.nonzero().flatten()
        at = torch.full((g.n_nodes,), -1, dtype=torch.long)
        at[index] = torch.arange(len(index))
        dst, src = p.edges()
        weight = g.edge_weights(dst, src).float()
        s = scores(g, p)
        v = View(
            node_threshold,
            edge_threshold,
            p,
            index,
            at[src].int().numpy(),
            at[dst].int().numpy(),
            weight.numpy(),
            s,
        )
        with self._lock:
            self._views[key] = v
            while len(self._views) > 8:
                self._views.popitem(last=False)
        return v

    def view_json(self, v: View) -> dict:
        g = self.graph
        return {
            "slug": self.slug,
            "prompt": g.prompt,
            "tokens": list(g.token_strings),
            "n_layers": g.n_layers,
            "scan": g.scan,
            "model": g.model_name,
            "clt": g.info.get("clt", ""),
            "node_threshold": v.node_threshold,
            "edge_threshold": v.edge_threshold,
            "nodes": [self.nodes[i] for i in v.index.tolist()],
            "n_edges": len(v.src),
            "n_nodes_full": g.n_nodes,
            "scores": v.scores,
        }

    # -- node lookups ----------------------------------------------------------------------------
    def node_index(self, node_id: str) -> int:
        i = self.id_to_index.get(node_id)
        if i is None:
            raise NotFound(f"graph {self.slug!r} has no node {node_id!r}")
        return i

    def neighbours(self, node_id: str, k: int = 10) -> dict:
        """The k strongest inputs (row) and outputs (column) of a node in the full graph, by |w|."""
        i = self.node_index(node_id)

        def top(vec: torch.Tensor) -> list[dict]:
            nz = vec.nonzero().flatten()
            if len(nz) == 0:
                return []
            order = vec[nz].abs().argsort(descending=True)[:k]
            total = float(vec.abs().sum())
            return [
                {"id": self.nodes[j]["id"], "weight": float(vec[j]), "share": float(vec[j].abs()) / total}
                for j in nz[order].tolist()
            ]

        out: dict[str, Any] = {
            "id": node_id,
            "inputs": top(self.graph.inputs(i)),
            "outputs": top(self.graph.outputs(i)),
        }
        att = self.attention(i, k)
        if att is not None:
            out["attention"] = att
        return out

    def _source_name(self, label: list) -> str:
        """A QK attribution source label (clt.attribution.qk) as text."""
        kind, *rest = label
        tok = self.graph.token_strings
        if kind == "feature":
            layer, pos, feat = rest
            return f"L{layer}/#{feat} @{pos}"
        if kind == "error":
            return f"error L{rest[0]} @{rest[1]}"
        if kind == "token":
            return f"token @{rest[0]} {tok[rest[0]]!r}"
        if kind == "head":
            return f"head L{rest[0]}.H{rest[1]} out @{rest[2]}"
        if kind == "constant":
            return f"constants @{rest[0]}"
        return f"{rest[0]} bias"

    def attention(self, i: int, k: int = 10) -> dict | None:
        """For a graph made with attention=True: the heads that carry node i's cross-position inputs
        (their loadings, strongest first, as a share of the edge) and why those heads attend there
        (QK attribution: the strongest query-source × key-source pairs). None without the data."""
        att = self.graph.attention
        if not att:
            return None
        edges, loads, bypass = att["edges"], att["loadings"], att["bypass"]
        pos = self.nodes[i]["pos"]
        inputs = []
        for r in (edges[:, 0] == i).nonzero().flatten().tolist():
            s = int(edges[r, 1])
            edge = float(self.graph.edge_weights(torch.tensor(i), torch.tensor(s)))
            flat = loads[r].flatten()
            H = loads.shape[-1]
            best = flat.abs().argsort(descending=True)[:3].tolist()
            inputs.append({
                "id": self.nodes[s]["id"], "weight": edge,
                "heads": [{"layer": j // H, "head": j % H, "loading": float(flat[j]),
                           "share": float(flat[j]) / edge if edge else 0.0,
                           "bypass": float(bypass[r, j // H])} for j in best if flat[j] != 0],
            })  # fmt: skip
        inputs.sort(key=lambda x: -abs(x["weight"]))
        keys = {self.nodes[self.node_index(x["id"])]["pos"] for x in inputs}
        qk = [
            {**{f: rec[f] for f in ("layer", "head", "query", "key", "score", "attention")},
             "pairs": [[self._source_name(u), self._source_name(v), w] for u, v, w in rec["top_pairs"][:k]],
             "query_top": [[self._source_name(u), w] for u, w in rec["query_top"][:k]],
             "key_top": [[self._source_name(u), w] for u, w in rec["key_top"][:k]]}
            for rec in att["qk"] if rec["query"] == pos and rec["key"] in keys
        ]  # fmt: skip
        return {"inputs": inputs[:k], "qk": qk}

    def feature_activations(self, layer: int, feature: int) -> list[float]:
        """The feature's activation at every prompt position (0 where it is not active)."""
        g = self.graph
        acts = torch.zeros(g.n_pos)
        m = (g.active_features[:, 0] == layer) & (g.active_features[:, 2] == feature)
        acts[g.active_features[m, 1]] = g.activation_values[m].float()
        return acts.tolist()

    def subgraph_scores(self, pinned: list[str]) -> dict:
        """Scores of the graph reduced to the pinned features (every other feature merged into its
        error node; errors, tokens and logits kept): what the subgraph alone explains."""
        g = self.graph
        mask = torch.ones(g.n_nodes, dtype=torch.bool)
        mask[: g.n_features] = False
        for nid in pinned:
            i = self.node_index(nid)
            if i < g.n_features:
                mask[i] = True
        p = Pruned(mask, torch.zeros(0, dtype=torch.bool), torch.zeros(0), torch.zeros(0), g.row_nodes)
        out = graph_scores(g, pruned_adjacency(g, p))
        return out | {"n_features": int(mask[: g.n_features].sum())}

    # -- paths -----------------------------------------------------------------------------------
    def paths(self, v: View, start: str, goal: str, k: int = 5) -> list[dict]:
        """The k strongest paths start → goal among the view's edges. A path's strength is the
        product of its edges' normalised weights Â[t, s] = |A[t, s]| / Σ_s' |A[t, s']| (the share
        of each target's input that the path carries); found by k-best dynamic programming in
        topological order (embeddings, layer 0 … L−1, logits: every edge goes up a layer)."""
        if not 1 <= k <= 50:
            raise ViewerError(f"k must be in 1…50, got {k}")
        pos = {int(gi): vi for vi, gi in enumerate(v.index.tolist())}
        s_g, t_g = self.node_index(start), self.node_index(goal)
        if s_g not in pos or t_g not in pos:
            raise NotFound("both ends of a path must be in the current view")
        s, t = pos[s_g], pos[t_g]
        if self.A_hat is None:
            self.A_hat = normalize_matrix(self.graph.edge_rows.float())  # [R, N]
        gi = v.index.numpy()
        rows = self.graph.row_index(torch.from_numpy(gi[v.dst]))
        strength = self.A_hat[rows, torch.from_numpy(gi[v.src])].numpy()
        n = len(gi)
        layer = np.array([self.nodes[j]["layer"] for j in gi])
        # nodes on some start → goal path: reachable forward from s and backward from t
        fwd, bwd = np.zeros(n, bool), np.zeros(n, bool)
        fwd[s], bwd[t] = True, True
        for _ in range(self.graph.n_layers + 2):
            fwd[v.dst[fwd[v.src]]] = True
            bwd[v.src[bwd[v.dst]]] = True
        on = fwd & bwd
        keep = on[v.src] & on[v.dst] & (strength > 0)
        es, ed, ew = v.src[keep], v.dst[keep], np.log(strength[keep])
        incoming: dict[int, list[int]] = {}
        for e, d in enumerate(ed.tolist()):
            incoming.setdefault(d, []).append(e)
        best: dict[int, list[tuple[float, int, int]]] = {s: [(0.0, -1, -1)]}
        for node in sorted(np.nonzero(on)[0].tolist(), key=lambda j: layer[j]):
            if node == s:
                continue
            cands = [
                (sc + float(ew[e]), int(es[e]), r)
                for e in incoming.get(node, [])
                for r, (sc, _, _) in enumerate(best.get(int(es[e]), []))
            ]
            best[node] = heapq.nlargest(k, cands)
        out = []
        for sc, prev, r in best.get(t, []) if t != s else []:
            path, at = [t], (prev, r)
            while at[0] != -1:
                path.append(at[0])
                _, p2, r2 = best[at[0]][at[1]]
                at = (p2, r2)
            ids = [self.nodes[gi[j]]["id"] for j in reversed(path)]
            out.append({"nodes": ids, "strength": math.exp(sc)})
        return out


class GraphFolder:
    """The graphs of one folder: `{slug}.pt` (the full graph, for the viewer's API) beside the
    circuit-tracer files `{slug}.json` and `graph-metadata.json`, and `{slug}.state.json` sidecars."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ViewerError(f"{root} is not a directory (clt attribute … --out DIR writes one)")
        self._cache: OrderedDict[str, LoadedGraph] = OrderedDict()
        self._lock = threading.Lock()
        self.write_lock = threading.Lock()  # graph-metadata.json and sidecars

    def listing(self) -> list[dict]:
        """Graphs with a full `.pt` graph, with their prompt (from the metadata index when present)."""
        meta = {}
        index = self.root / "graph-metadata.json"
        if index.exists():
            try:
                meta = {g.get("slug"): g for g in json.loads(index.read_text()).get("graphs", [])}
            except (json.JSONDecodeError, AttributeError):
                meta = {}
        out = []
        for p in sorted(self.root.glob("*.pt"), key=lambda p: p.stat().st_mtime):
            m = meta.get(p.stem, {})
            out.append(
                {
                    "slug": p.stem,
                    "prompt": m.get("prompt", ""),
                    "has_json": (self.root / f"{p.stem}.json").exists(),
                }
            )
        return out

    def path(self, slug: str, suffix: str) -> Path:
        try:
            check_slug(slug)
        except CLTError:
            raise NotFound(f"no graph {slug!r}") from None
        return self.root / f"{slug}{suffix}"

    def get(self, slug: str) -> LoadedGraph:
        path = self.path(slug, ".pt")
        if not path.exists():
            raise NotFound(f"no graph {slug!r} in {self.root} (no {slug}.pt)")
        mtime = path.stat().st_mtime_ns
        with self._lock:
            g = self._cache.get(slug)
            if g is not None and g.mtime == mtime:
                self._cache.move_to_end(slug)
                return g
        try:
            graph = Graph.from_pt(path)
            loaded = LoadedGraph(slug, graph, mtime)
        except CLTError as e:
            raise BadGraph(f"graph {slug!r} cannot be read: {e}") from None
        except Exception as e:  # a damaged file that torch still half-parsed
            raise BadGraph(f"graph {slug!r} cannot be read: {type(e).__name__}: {e}") from None
        with self._lock:
            self._cache[slug] = loaded
            while len(self._cache) > 4:
                self._cache.popitem(last=False)
        return loaded
