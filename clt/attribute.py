"""Attribute a prompt with a trained CLT: `python -m clt.attribute CHECKPOINT "prompt" --out DIR`.

CHECKPOINT: a training run dir (`runs/…`), its native `clt/` dir, or a circuit-tracer export.
Writes to DIR: {slug}.pt (the full graph; graph.pt by default), {slug}.json + graph-metadata.json
(the circuit-tracer viewer's files, pruned), graph.png (the pruned graph), scores.json; prints the
top features per logit and the replacement/completeness scores. The graph file's `metadata.scan`
points at the CLT's feature store (CHECKPOINT/features, or the Hub repo's), where the viewers find
the feature cards;
`--cards` computes (and adds to the store) the cards of the graph's features that it lacks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .config import ATTRIBUTION_DTYPES, ModelConfig
from .errors import CLTError, command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m clt.attribute",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="run dir, native CLT dir, or circuit-tracer export dir")
    p.add_argument("prompt", help="the text to attribute (a BOS token is prepended)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--node-threshold", type=float, default=0.8, help="share of node influence kept (0, 1]")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="share of edge influence kept (0, 1]")
    p.add_argument("--max-feature-nodes", type=int, default=None, help="feature rows computed (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="targets per backward pass (memory knob)")
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--model", default=None, help="subject model (default: the one the CLT was trained on)")
    p.add_argument("--dtype", default="float32", choices=ATTRIBUTION_DTYPES, help="subject model dtype")
    p.add_argument("--device", default="auto", help="cpu, cuda, … (auto: cuda when available)")
    p.add_argument(
        "--slug", default="graph", help="name of the graph in the viewer files ({slug}.pt, {slug}.json)"
    )
    p.add_argument("--top", type=int, default=5, help="features printed per logit")
    p.add_argument("--no-plot", action="store_true", help="skip graph.png")
    p.add_argument(
        "--attention",
        action="store_true",
        help="also split cross-position edges into per-head loadings and attribute the heads' "
        "scores (QK attribution); the viewer shows them",
    )
    p.add_argument(
        "--cards",
        action="store_true",
        help="compute the feature cards of the pruned graph's features (those the store lacks) "
        "and add them to the store",
    )
    p.add_argument("--features", default=None, help="the feature store (default: next to the CLT)")
    p.add_argument(
        "--cards-tokens",
        type=int,
        default=65_536,
        help="tokens scanned for --cards when there is no store yet (else the store's count)",
    )
    p.add_argument("--cache", default=None, help="activation cache to scan for --cards (default: online)")
    return p


def store_location(checkpoint: str, features: str | None) -> tuple[str, str | None]:
    """(metadata.scan, the local store dir or None): a local store's absolute path (circuit-tracer's
    frontend reads a scan that starts with "/" from its --features_dir server), or a Hub repo id
    (its frontend then reads the repo's features/ folder)."""
    from .features.pipeline import default_store_dir

    if features:
        d = Path(features).resolve()
        return str(d), str(d)
    if Path(checkpoint).exists():
        d = default_store_dir(checkpoint).resolve()
        return str(d), str(d)
    return checkpoint, None


def graph_cards(
    args: argparse.Namespace, clt, subject, pruned_features: list[torch.Tensor], store: str
) -> Path:
    """The cards of these features (per layer), computed into `store` (with the store's settings
    when it exists)."""
    from dataclasses import replace

    from .config import DataConfig, FeaturesConfig, FeaturesJobConfig
    from .features.pipeline import compute_store
    from .features.store import FeatureStore

    data, f = (
        DataConfig(),
        FeaturesConfig(checkpoint=str(args.checkpoint), out=store, tokens=args.cards_tokens, task=0, tasks=1),
    )
    run_cfg = Path(args.checkpoint) / "config.json"
    if run_cfg.exists() and "data" in json.loads(
        run_cfg.read_text()
    ):  # a run dir: the text it was trained on
        data = DataConfig(**json.loads(run_cfg.read_text())["data"])
    if (Path(store) / "manifest.json").exists():  # add to a store: its settings and text
        m = FeatureStore(store).manifest
        keys = {k: v for k, v in m["settings"].items() if k in FeaturesConfig.__dataclass_fields__}
        f = replace(f, **(keys | {"checkpoint": str(args.checkpoint), "out": store, "task": 0, "tasks": 1}))
        text = {k: v for k, v in m["text"].items() if k in DataConfig.__dataclass_fields__}
        data = replace(data, **text)
    if args.cache:
        data = replace(data, cache=args.cache)
    job = FeaturesJobConfig(data=data, features=f).validate()
    out = compute_store(job, clt=clt, subject=subject, features=pruned_features, device=str(clt.W_enc.device))
    assert out is not None  # one task: the store is written
    return out


def run(args: argparse.Namespace) -> dict:
    from .attribution import attribute, prune, scores
    from .attribution.graph import check_threshold, write_graph_files
    from .attribution.plot import plot_graph, top_features
    from .features.store import clt_checksum
    from .io import load_clt
    from .subject import load_subject

    check_threshold("node_threshold", args.node_threshold)
    check_threshold("edge_threshold", args.edge_threshold)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    clt = load_clt(args.checkpoint, device)
    arch = clt.arch
    name = args.model or arch.subject_model
    if not name:
        raise CLTError("the checkpoint does not name its subject model: pass --model")
    if args.model and arch.subject_model and args.model != arch.subject_model:
        print(
            f"warning: the CLT was trained on {arch.subject_model!r}, attributing with {args.model!r}",
            file=sys.stderr,
        )
    subject = load_subject(
        ModelConfig(
            name_or_path=name, dtype=args.dtype, input_hook=arch.input_hook, output_hook=arch.output_hook
        ),
        device,
        key="--model" if args.model else "the CLT's subject model (--model to change it)",
    )
    scan, store = store_location(str(args.checkpoint), args.features)
    if args.cards and store is None:
        raise CLTError(
            f"--cards needs a local feature store for the Hub CLT {args.checkpoint}: pass --features DIR"
        )
    t0 = time.perf_counter()
    graph = attribute(
        args.prompt,
        clt,
        subject,
        max_n_logits=args.max_n_logits,
        desired_logit_prob=args.desired_logit_prob,
        max_feature_nodes=args.max_feature_nodes,
        batch_size=args.batch_size,
        scan=scan,
        attention=args.attention,
    )
    graph.info["clt"] = str(args.checkpoint)
    graph.info["clt_checksum"] = clt_checksum(clt)  # the viewer refuses interventions with another CLT
    seconds = time.perf_counter() - t0
    pruned = prune(graph, args.node_threshold, args.edge_threshold)
    if args.cards:
        assert store is not None
        kept = torch.nonzero(pruned.node_mask[: graph.n_features]).flatten().tolist()
        layers = [graph.feature_of(i) for i in kept]  # (layer, position, feature)
        wanted = [
            torch.tensor(sorted({f for l, _, f in layers if l == layer}), dtype=torch.long)
            for layer in range(arch.n_layers)
        ]
        t1 = time.perf_counter()
        graph_cards(args, clt, subject, wanted, store)
        print(
            f"cards of the graph's {sum(len(w) for w in wanted)} features in {store} "
            f"({time.perf_counter() - t1:.1f} s)"
        )
    out = Path(args.out)
    graph.to_pt(out / f"{args.slug}.pt")
    write_graph_files(graph, pruned, out, args.slug, args.node_threshold, args.edge_threshold)
    if not args.no_plot:
        plot_graph(graph, pruned, out / "graph.png")
    result = scores(graph, pruned) | {
        "seconds": round(seconds, 3),
        "n_tokens": graph.n_pos,
        "n_active_features": graph.info["n_active_features"],
    }
    (out / "scores.json").write_text(json.dumps(result, indent=2))

    print(
        f"\n{graph.n_pos} tokens, {graph.info['n_active_features']} active features, "
        f"{graph.n_features} visited, {graph.n_nodes} nodes; attribution {seconds:.1f} s"
    )
    for k, feats in top_features(graph, args.top):
        print(f"\n{graph.describe(graph.logit_slice.start + k)}: top direct feature inputs")
        for w, i in feats:
            print(f"  {w:+9.4f}  {graph.describe(i)}")
    print(
        f"\nscores: replacement {result['full/replacement_score']:.3f} "
        f"(pruned {result['pruned/replacement_score']:.3f}), completeness "
        f"{result['full/completeness_score']:.3f} "
        f"(pruned {result['pruned/completeness_score']:.3f}); "
        f"pruned graph: {result['pruned/n_nodes']} nodes, {result['pruned/n_edges']} edges"
    )
    print(
        f"wrote {out}/{args.slug}.pt, {out}/{args.slug}.json, {out}/graph-metadata.json"
        + ("" if args.no_plot else f", {out}/graph.png")
        + f", {out}/scores.json"
    )
    return result


@command
def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
