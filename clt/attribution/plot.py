"""A PNG drawing of a pruned attribution graph: positions left to right, token embeddings at the
bottom, layers upwards, logits at the top; edge colour by sign, width and opacity by |weight|."""

from __future__ import annotations

import os
from collections import defaultdict

import torch

from ..files import atomic_file
from .graph import Graph, Pruned

POSITIVE, NEGATIVE = "#2563eb", "#dc2626"


def plot_graph(
    graph: Graph, pruned: Pruned, path: str | os.PathLike, max_edges: int = 1500, title: str | None = None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, T = graph.n_layers, graph.n_pos
    kept = pruned.node_mask.nonzero().flatten().tolist()

    def cell(i: int) -> tuple[int, float]:  # (position, row): tokens −1, layers 0..L−1, logits L
        if i < graph.n_features:
            layer, pos, _ = graph.feature_of(i)
            return pos, layer
        if i < graph.error_slice.stop:
            layer, pos = divmod(i - graph.n_features, T)
            return pos, layer
        if i < graph.token_slice.stop:
            return i - graph.token_slice.start, -1
        return int(graph.info.get("target_position", T - 1)), L

    groups: dict[tuple[int, float], list[int]] = defaultdict(list)
    for i in kept:
        groups[cell(i)].append(i)
    xy: dict[int, tuple[float, float]] = {}
    for (pos, row), members in groups.items():
        n = len(members)
        for j, i in enumerate(members):
            xy[i] = (pos + (j - (n - 1) / 2) * min(0.8 / max(n, 1), 0.15), row)

    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * T + 2), max(5.0, 0.35 * L + 3)))
    dst, src = pruned.edges()
    w = graph.edge_weights(dst, src)
    if len(w):
        order = w.abs().argsort(descending=True)[:max_edges].flip(0)  # strongest drawn last (on top)
        wmax = float(w.abs().max())
        for k in order.tolist():
            s, t, val = int(src[k]), int(dst[k]), float(w[k])
            if s not in xy or t not in xy:
                continue
            r = abs(val) / wmax
            ax.plot(
                [xy[s][0], xy[t][0]],
                [xy[s][1], xy[t][1]],
                color=POSITIVE if val > 0 else NEGATIVE,
                lw=0.3 + 2.5 * r,
                alpha=0.15 + 0.7 * r,
                zorder=1,
            )

    infl = pruned.influence
    imax = float(infl.max()) if len(infl) else 1.0
    for kind, sl, marker, color in (
        ("feature", slice(0, graph.n_features), "o", "#f59e0b"),
        ("error", graph.error_slice, "s", "#9ca3af"),
        ("token", graph.token_slice, "D", "#10b981"),
        ("logit", graph.logit_slice, "^", "#7c3aed"),
    ):
        idx = [i for i in kept if sl.start <= i < sl.stop]
        if not idx:
            continue
        sizes = [
            30 + 200 * float(infl[i]) / max(imax, 1e-12) if kind in ("feature", "error") else 80 for i in idx
        ]
        ax.scatter(
            [xy[i][0] for i in idx],
            [xy[i][1] for i in idx],
            s=sizes,
            marker=marker,
            c=color,
            edgecolors="black",
            linewidths=0.4,
            zorder=2,
            label=kind,
        )
    for k in range(graph.n_logits):
        i = graph.logit_slice.start + k
        if i in xy:
            ax.annotate(
                f"{graph.logit_token_strings[k]!r} {float(graph.logit_probabilities[k]):.2f}",
                xy[i],
                textcoords="offset points",
                xytext=(0, 7),
                fontsize=6,
                rotation=70,
                ha="left",
                va="bottom",
            )
    ax.set_xticks(range(T))
    ax.set_xticklabels([repr(s)[1:-1] for s in graph.token_strings], rotation=60, ha="right", fontsize=7)
    ticks = [-1, *range(0, L, max(1, L // 10)), L]
    ax.set_yticks(ticks)
    ax.set_yticklabels(["emb", *[f"L{t}" for t in ticks[1:-1]], "logits"])
    ax.set_xlim(-0.7, T - 0.3)
    ax.set_ylim(-1.7, L + 2.5)
    ax.grid(alpha=0.15)
    ax.plot([], [], color=POSITIVE, label="edge +")
    ax.plot([], [], color=NEGATIVE, label="edge −")
    ax.legend(loc="upper left", fontsize=7, ncol=6, frameon=False, bbox_to_anchor=(0, 1.08))
    ax.set_title(title or graph.prompt[:80], fontsize=9, pad=22)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)


def top_features(graph: Graph, k: int = 5) -> list[tuple[int, list[tuple[float, int]]]]:
    """For each logit node: its k largest direct feature inputs, (weight, node) by |weight|."""
    out = []
    for j in range(graph.n_logits):
        row = graph.edge_rows[graph.n_features + j, : graph.n_features]
        top = row.abs().topk(min(k, len(row))).indices if len(row) else torch.zeros(0, dtype=torch.long)
        out.append((j, [(float(row[i]), int(i)) for i in top]))
    return out
