"""Attribution graphs, pruning, scores and interventions with trained CLTs (docs/DESIGN.md §6)."""

from .adjacency import attribute, dense_rows, feature_vectors, logit_targets, node_bias
from .graph import Graph, Pruned, compute_influence, graph_scores, normalize_matrix, prune, scores, to_json
from .replacement import AttributionError, Intervention, PromptContext, ReplacementModel

__all__ = [
    "AttributionError",
    "Graph",
    "Intervention",
    "PromptContext",
    "Pruned",
    "ReplacementModel",
    "attribute",
    "compute_influence",
    "dense_rows",
    "feature_vectors",
    "graph_scores",
    "logit_targets",
    "node_bias",
    "normalize_matrix",
    "prune",
    "scores",
    "to_json",
]
