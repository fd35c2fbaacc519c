"""Attribution graphs: the node layout, save/load, pruning, scores and the viewer's JSON.

Nodes, in this order (the adjacency layout of docs/DESIGN.md §5 and circuit-tracer):

    [selected features, sorted by (layer, pos, feature)] [errors, layer-major: L·T] [tokens: T] [logits: K]

`adjacency[t, s]` is the direct effect of source s on target t: the change of t's pre-activation
(feature) or demeaned, pre-softcap logit (logit) per unit change of s *in units of s's own value*
(a feature's activation, an error vector, a token embedding). Error and token rows are zero
(they have no inputs); logit columns are zero.

Only the rows that can be non-zero are stored: `edge_rows` [R, N], R = n_features + n_logits (the
feature rows, then the logit rows; `row_nodes` maps row -> node). N grows with L·T error nodes, so a
dense N × N matrix would be quadratic in the prompt; R × N is linear at fixed `max_feature_nodes`.
`adjacency_matrix` still builds the dense one (small graphs, checks).

Influence: Â = row-normalised |A|, w = logit probabilities on the logit nodes,
influence = w·((I − Â)⁻¹ − I) = w·Â + w·Â² + … (Â is nilpotent: the graph is a DAG); on the rows:
x₀ = w on the rows, influence = Σ_k x_k·R̂ with x_{k+1} = (x_k·R̂)[row_nodes].
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_file, write_atomic
from .replacement import AttributionError

GRAPH_FORMAT = 2  # 1: a dense adjacency_matrix (still read)


@dataclass
class Graph:
    prompt: str
    input_tokens: torch.Tensor  # [T] ids
    token_strings: list[str]  # [T] decoded tokens
    active_features: torch.Tensor  # [n_active, 3] (layer, pos, feature), sorted
    activation_values: torch.Tensor  # [n_active]
    selected_features: torch.Tensor  # [n_sel] indices into active_features (ascending)
    edge_rows: torch.Tensor  # [n_sel + K, N] fp32: the feature rows, then the logit rows (targets)
    logit_tokens: torch.Tensor  # [K] vocab ids
    logit_token_strings: list[str]  # [K]
    logit_probabilities: torch.Tensor  # [K]
    n_layers: int
    vocab_size: int
    # per node: the target's value (pre-activation / demeaned logit) and its constant part
    # (what the frozen model gives with every source at zero). Σ_s A[t, s] + bias[t] = value[t]
    # when every active feature is selected (see node_unvisited otherwise). Zero for error and
    # token nodes.
    node_values: torch.Tensor | None = None
    node_bias: torch.Tensor | None = None
    # per node: the summed direct effect of the active features that were never visited (their
    # columns are dropped); Σ_s A[t, s] + unvisited[t] + bias[t] = value[t] always holds
    node_unvisited: torch.Tensor | None = None
    scan: str = ""  # names the CLT (checkpoint or repo) for the viewer
    model_name: str = ""
    info: dict = field(default_factory=dict)
    # attribute(..., attention=True): head loadings of the pruned graph's cross-position edges and
    # QK attributions of the heads carrying them (clt.attribution.qk.attention_summary); else None
    attention: dict | None = None

    # -- layout ----------------------------------------------------------------------------------
    @property
    def n_pos(self) -> int:
        return len(self.input_tokens)

    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def n_nodes(self) -> int:
        return self.edge_rows.shape[1]

    @property
    def row_nodes(self) -> torch.Tensor:
        """The node of each stored row: [n_features + n_logits]."""
        return torch.cat([torch.arange(self.n_features), torch.arange(self.logit_slice.start, self.n_nodes)])

    def row_index(self, nodes: torch.Tensor) -> torch.Tensor:
        """Node indices -> their rows in `edge_rows` (−1 for error and token nodes: no inputs)."""
        nodes = torch.as_tensor(nodes)
        k = nodes - self.logit_slice.start + self.n_features
        return torch.where(
            nodes < self.n_features, nodes, torch.where(nodes >= self.logit_slice.start, k, -1)
        )

    def edge_weights(self, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """A[dst, src] for node pairs whose targets are feature or logit nodes."""
        return self.edge_rows[self.row_index(dst), src]

    def inputs(self, node: int) -> torch.Tensor:
        """Row `node` of the adjacency (its direct inputs): [N]."""
        r = int(self.row_index(torch.tensor(node)))
        return self.edge_rows[r] if r >= 0 else self.edge_rows.new_zeros(self.n_nodes)

    def outputs(self, node: int) -> torch.Tensor:
        """Column `node` of the adjacency (its direct effects on every node): [N]."""
        col = self.edge_rows.new_zeros(self.n_nodes)
        col[self.row_nodes] = self.edge_rows[:, node]
        return col

    @property
    def adjacency_matrix(self) -> torch.Tensor:
        """The dense [N, N] adjacency (O(N²) memory: for small graphs and checks)."""
        return dense(self.edge_rows, self.row_nodes, self.n_nodes)

    @staticmethod
    def rows_of(A: torch.Tensor, n_features: int, n_logits: int) -> torch.Tensor:
        """A dense [N, N] adjacency -> its feature and logit rows (`edge_rows`)."""
        N = A.shape[0]
        return torch.cat([A[:n_features], A[N - n_logits :]])

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_layers * self.n_pos)

    @property
    def token_slice(self) -> slice:
        e = self.error_slice.stop
        return slice(e, e + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        return slice(self.token_slice.stop, self.n_nodes)

    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(self.n_nodes, device=self.edge_rows.device)
        w[self.logit_slice] = self.logit_probabilities.to(w)
        return w

    def feature_of(self, node: int) -> tuple[int, int, int]:
        """Node index of a selected feature -> (layer, pos, feature)."""
        layer, pos, feat = self.active_features[self.selected_features[node]].tolist()
        return layer, pos, feat

    def describe(self, node: int) -> str:
        if node < self.n_features:
            layer, pos, feat = self.feature_of(node)
            return f"feature L{layer}/#{feat} @{pos} {self.token_strings[pos]!r}"
        if node < self.error_slice.stop:
            layer, pos = divmod(node - self.n_features, self.n_pos)
            return f"error L{layer} @{pos} {self.token_strings[pos]!r}"
        if node < self.token_slice.stop:
            pos = node - self.token_slice.start
            return f"token @{pos} {self.token_strings[pos]!r}"
        k = node - self.logit_slice.start
        return f"logit {self.logit_token_strings[k]!r} (p={float(self.logit_probabilities[k]):.3f})"

    # -- save / load -----------------------------------------------------------------------------
    def to_pt(self, path: str | os.PathLike) -> Path:
        """Write the graph (a dict of tensors and plain values) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = asdict(self)
        d["format"] = GRAPH_FORMAT
        with atomic_file(path) as tmp:
            torch.save(d, tmp)
        return path

    @classmethod
    def from_pt(cls, path: str | os.PathLike, map_location: str = "cpu") -> Graph:
        try:
            d = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise AttributionError(f"cannot read graph {path}: {e}") from e
        fmt = d.pop("format", None) if isinstance(d, dict) else None
        if fmt not in (1, GRAPH_FORMAT):
            raise AttributionError(f"{path} is not a clt graph file (format {GRAPH_FORMAT})")
        if fmt == 1:  # the dense adjacency of earlier code
            A = d.pop("adjacency_matrix")
            d["edge_rows"] = cls.rows_of(A, len(d["selected_features"]), len(d["logit_tokens"]))
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# Influence and pruning


def dense(rows: torch.Tensor, row_nodes: torch.Tensor, n_nodes: int) -> torch.Tensor:
    """Rows [R, N] of the nodes `row_nodes` -> the [N, N] matrix with zeros elsewhere."""
    out = rows.new_zeros(n_nodes, n_nodes)
    out[row_nodes.to(rows.device)] = rows
    return out


def influence_on_rows(
    R_hat: torch.Tensor, row_nodes: torch.Tensor, w_rows: torch.Tensor, max_iter: int = 10_000
) -> torch.Tensor:
    """w·(Â + Â² + …) for Â given by its non-zero rows R̂ [R, N] (all other rows zero), w by its
    values on those rows [R]. -> [N]. Memory O(R·N); each step is one [R] × [R, N] product."""
    row_nodes = row_nodes.to(R_hat.device)
    cur = w_rows @ R_hat
    total = cur.clone()
    for _ in range(max_iter):
        x = cur[row_nodes]
        if not x.any():
            return total
        cur = x @ R_hat
        total += cur
    raise AttributionError("influence did not converge: the graph has a cycle")


def normalize_matrix(A: torch.Tensor) -> torch.Tensor:
    """|A| with each row (a target's inputs) summing to 1 (zero rows stay zero)."""
    M = A.abs()
    return M / M.sum(1, keepdim=True).clamp_min(1e-10)


def compute_influence(A_hat: torch.Tensor, w: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """w·(Â + Â² + …) = w·((I − Â)⁻¹ − I) by power series (exact: Â is nilpotent on a DAG)."""
    cur = w @ A_hat
    total = cur.clone()
    for _ in range(max_iter):
        if not cur.any():
            return total
        cur = cur @ A_hat
        total += cur
    raise AttributionError("influence did not converge: the graph has a cycle")


def influence_by_inverse(A_hat: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The same influence by an explicit matrix inverse (float64), for checks and small graphs."""
    n = A_hat.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=A_hat.device)
    return w.double() @ (torch.linalg.inv(eye - A_hat.double()) - eye)


def find_threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The score cut-off that keeps the smallest top set reaching `fraction` of the total.
    fraction = 1 keeps every score ≥ 0."""
    if fraction >= 1.0:
        return scores.new_zeros(())
    s = scores.flatten()
    s = s[s > 0].sort(descending=True).values  # zeros add nothing: sort only the rest (most of N²)
    if len(s) == 0:
        return scores.new_zeros(())
    cum = s.cumsum(0) / s.sum()
    idx = int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype, device=cum.device)))
    return s[min(idx, len(s) - 1)]


def check_threshold(name: str, value: float) -> None:
    if not (0.0 < value <= 1.0):
        raise AttributionError(f"{name} must be in (0, 1], got {value}")


@dataclass
class Pruned:
    node_mask: torch.Tensor  # [N] bool
    edge_rows: torch.Tensor  # [R, N] bool: the kept edges, as rows of the graph's `row_nodes`
    influence: torch.Tensor  # [N] node influence on the logits (unpruned graph)
    cumulative_scores: torch.Tensor  # [N] cumulative influence fraction at each node's rank
    row_nodes: torch.Tensor | None = None  # [R] (the graph's)

    def edges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept edges as node indices (targets, sources), in row-major order."""
        assert self.row_nodes is not None
        r, src = self.edge_rows.nonzero(as_tuple=True)
        return self.row_nodes.to(r.device)[r], src

    @property
    def edge_mask(self) -> torch.Tensor:
        """The kept edges as a dense [N, N] mask (O(N²): small graphs and checks)."""
        assert self.row_nodes is not None
        return dense(self.edge_rows, self.row_nodes, self.edge_rows.shape[1])


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Keep the nodes carrying `node_threshold` of the influence on the logits (tokens and logits
    always kept), then the edges carrying `edge_threshold` of the edge influence among them; then
    drop dangling nodes (features or errors left without outgoing edges, features left without
    incoming ones) until stable. Thresholds of 1.0 keep every node and every non-zero edge.
    Works on the rows (memory O(R·N))."""
    check_threshold("node_threshold", node_threshold)
    check_threshold("edge_threshold", edge_threshold)
    R = graph.edge_rows.float()
    rn = graph.row_nodes.to(R.device)
    w = graph.logit_weights().to(R.device)[rn]  # [R]
    n_feat, keep_from = graph.n_features, graph.token_slice.start

    influence = influence_on_rows(normalize_matrix(R), rn, w)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[keep_from:] = True

    P = R.clone()
    P[~node_mask[rn]] = 0
    P[:, ~node_mask] = 0
    P_hat = normalize_matrix(P)
    edge_scores = P_hat * (influence_on_rows(P_hat, rn, w)[rn] + w)[:, None]
    edge_rows = (edge_scores >= find_threshold(edge_scores, edge_threshold)) & (P != 0)
    del P, P_hat, edge_scores

    # dangling: lost every outgoing (incoming) edge that it had before pruning
    had_out = (R != 0).any(0)
    had_in = (R[:n_feat] != 0).any(1)  # feature rows come first
    while True:
        old = node_mask.clone()
        edge_rows[~node_mask[rn]] = False
        edge_rows[:, ~node_mask] = False
        node_mask[:keep_from] &= edge_rows[:, :keep_from].any(0) | ~had_out[:keep_from]
        node_mask[:n_feat] &= edge_rows[:n_feat].any(1) | ~had_in
        if torch.equal(old, node_mask):
            break

    order = influence.argsort(descending=True)
    cum = influence[order].cumsum(0) / influence.sum().clamp_min(1e-30)
    cumulative = torch.zeros_like(influence)
    cumulative[order] = cum
    return Pruned(node_mask, edge_rows, influence, cumulative, rn)


def graph_scores(graph: Graph, rows: torch.Tensor | None = None) -> dict[str, float]:
    """Replacement score (share of the token-or-error end points of influence paths that are
    tokens) and completeness score (influence-weighted share of each node's normalised inputs that
    come from non-error nodes; summed over all nodes, as circuit-tracer does). `rows`: edge rows
    in the graph's layout to score instead of its own (a pruned graph's)."""
    R_hat = normalize_matrix((graph.edge_rows if rows is None else rows).float())
    rn = graph.row_nodes.to(R_hat.device)
    w = graph.logit_weights().to(R_hat.device)
    infl = influence_on_rows(R_hat, rn, w[rn])
    tok, err = infl[graph.token_slice].sum(), infl[graph.error_slice].sum()
    replacement = tok / (tok + err).clamp_min(1e-30)
    non_error = torch.ones_like(w)  # error and token nodes have no inputs
    non_error[rn] = 1 - R_hat[:, graph.error_slice].sum(1)
    out = infl + w
    completeness = (non_error * out).sum() / out.sum().clamp_min(1e-30)
    return {"replacement_score": float(replacement), "completeness_score": float(completeness)}


def pruned_adjacency(graph: Graph, pruned: Pruned) -> torch.Tensor:
    """The edge rows of the pruned graph for scoring: a pruned feature's outgoing edges are merged
    into the error node of its (layer, position) (what the graph no longer explains counts as
    error), its row is cleared; error, token and logit nodes stay. [R, N]"""
    A = graph.edge_rows.float().clone()
    n_feat = graph.n_features
    gone = (~pruned.node_mask[:n_feat]).nonzero().flatten()
    if len(gone):
        layer_pos = graph.active_features[graph.selected_features[gone]][:, :2]
        err_cols = n_feat + layer_pos[:, 0] * graph.n_pos + layer_pos[:, 1]
        A.index_add_(1, err_cols.to(A.device), A[:, gone])
        A[:, gone] = 0
        A[gone] = 0  # feature rows come first: row = node
    return A


def scores(graph: Graph, pruned: Pruned | None = None) -> dict[str, float]:
    """Replacement and completeness scores of the full graph and (if given) the pruned one."""
    out = {f"full/{k}": v for k, v in graph_scores(graph).items()}
    if pruned is not None:
        out |= {f"pruned/{k}": v for k, v in graph_scores(graph, pruned_adjacency(graph, pruned)).items()}
        out["pruned/n_nodes"] = int(pruned.node_mask.sum())
        out["pruned/n_edges"] = int(pruned.edge_rows.sum())
    out["full/n_nodes"] = graph.n_nodes
    out["full/n_edges"] = int((graph.edge_rows != 0).sum())
    return out


# ---------------------------------------------------------------------------------------------
# The circuit-tracer viewer's JSON (frontend/graph_models.py: metadata, qParams, nodes, links)


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def json_nodes(graph: Graph, pruned: Pruned) -> dict[int, dict]:
    """Node index -> viewer node, for the kept nodes. Error ids use the current form
    `{layer}_-1_{pos}` (circuit-tracer PRs #100/#102)."""
    nodes: dict[int, dict] = {}
    cum = pruned.cumulative_scores.tolist()
    L, T = graph.n_layers, graph.n_pos

    def node(**kw):
        base = {
            "token_prob": 0.0,
            "is_target_logit": False,
            "run_idx": 0,
            "reverse_ctx_idx": 0,
            "clerp": "",
            "influence": None,
            "activation": None,
        }
        return base | kw

    for i in pruned.node_mask.nonzero().flatten().tolist():
        if i < graph.n_features:
            layer, pos, feat = graph.feature_of(i)
            nodes[i] = node(
                node_id=f"{layer}_{feat}_{pos}",
                feature=_cantor(layer, feat),
                layer=str(layer),
                ctx_idx=pos,
                feature_type="cross layer transcoder",
                jsNodeId=f"{layer}_{feat}-0",
                influence=cum[i],
                activation=float(graph.activation_values[graph.selected_features[i]]),
            )
        elif i < graph.error_slice.stop:
            layer, pos = divmod(i - graph.n_features, T)
            nodes[i] = node(
                node_id=f"{layer}_-1_{pos}",
                feature=-1,
                layer=str(layer),
                ctx_idx=pos,
                feature_type="mlp reconstruction error",
                jsNodeId=f"{layer}_-1-{pos}",
                influence=cum[i],
            )
        elif i < graph.token_slice.stop:
            pos = i - graph.token_slice.start
            vocab = int(graph.input_tokens[pos])
            nodes[i] = node(
                node_id=f"E_{vocab}_{pos}",
                feature=pos,
                layer="E",
                ctx_idx=pos,
                feature_type="embedding",
                jsNodeId=f"E_{vocab}-{pos}",
                influence=cum[i],
            )
        else:
            k = i - graph.logit_slice.start
            vocab, p = int(graph.logit_tokens[k]), float(graph.logit_probabilities[k])
            at = int(graph.info.get("target_position", T - 1))  # the last position, or BERT's [MASK]
            nodes[i] = node(
                node_id=f"{L + 1}_{vocab}_{at}",
                feature=vocab,
                layer=str(L + 1),
                ctx_idx=at,
                feature_type="logit",
                token_prob=p,
                is_target_logit=k == 0,
                jsNodeId=f"L_{vocab}-{at}",
                clerp=f'Output "{graph.logit_token_strings[k]}" (p={p:.3f})',
            )
    return nodes


def check_slug(slug: str) -> str:
    """A graph's name: it names files ({slug}.pt, {slug}.json) and URL paths, so no separators."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", slug) or slug.endswith(
        (".state", ".json", ".pt")
    ):
        raise AttributionError(
            f"graph slug {slug!r}: use 1-128 letters, digits, '.', '_' or '-' (starting with a "
            "letter or digit)"
        )
    return slug


def to_json(
    graph: Graph, pruned: Pruned, slug: str, node_threshold: float, edge_threshold: float | None = None
) -> dict:
    """The graph file the circuit-tracer viewer reads (pruned: kept nodes and edges only)."""
    nodes = json_nodes(graph, pruned)
    dst, src = pruned.edges()
    weights = graph.edge_weights(dst, src).tolist()
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": wt}
        for s, t, wt in zip(src.tolist(), dst.tolist(), weights)
        if s in nodes and t in nodes
    ]
    connected = {x for link in links for x in (link["source"], link["target"])}
    used = [
        n for n in nodes.values() if n["node_id"] in connected or n["feature_type"] in ("embedding", "logit")
    ]
    metadata = {
        "slug": slug,
        "scan": graph.scan,
        "transcoder_list": [],
        "prompt_tokens": list(graph.token_strings),
        "prompt": graph.prompt,
        "node_threshold": node_threshold,
        "schema_version": 1,
        "pruning_settings": {"node_threshold": node_threshold, "edge_threshold": edge_threshold},
        "info": {"model": graph.model_name, "generator": {"name": "clt"}, **graph.info},
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_graph_files(
    graph: Graph,
    pruned: Pruned,
    out_dir: str | os.PathLike,
    slug: str,
    node_threshold: float,
    edge_threshold: float | None = None,
) -> Path:
    """Write `{slug}.json` and add its metadata to `graph-metadata.json` (the viewer's index)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_json(graph, pruned, check_slug(slug), node_threshold, edge_threshold)
    write_atomic(out / f"{slug}.json", json.dumps(data))
    index_path = out / "graph-metadata.json"
    index: dict[str, Any] = {"graphs": []}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError:
            pass
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug] + [data["metadata"]]
    write_atomic(index_path, json.dumps(index, indent=2))
    return out / f"{slug}.json"
