"""Feature cards for a trained CLT (also `clt features …`):

    python -m clt.features runs/demo features.tokens=262144            # online, through the subject
    python -m clt.features runs/demo data=cached data.cache=cache/sotu   # from an activation cache
    sbatch --array=0-7 slurm/features.sbatch runs/demo …                  # 8 tasks, merged by the last
    python -m clt.features merge runs/demo/features.work                 # … or by hand
    python -m clt.features render runs/demo/features 3 17 --out card.png # one card as a PNG

Keys: clt/config.py (FeaturesJobConfig, FeaturesConfig). Running the same command again after a
kill resumes from the last resume point.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from clt.config import FeaturesJobConfig, load_config
from clt.errors import command
from clt.features.store import FeatureError


def run(job: FeaturesJobConfig, progress: bool = True) -> int:
    from .pipeline import compute_store
    from .store import FeatureStore

    out = compute_store(job, progress=progress)
    if out is None:
        print(
            "this task's share is scanned; the store is written when every task's is (or: "
            "python -m clt.features merge <store>.work)"
        )
        return 0
    m = FeatureStore(out).manifest
    mb = sum(v["bytes"] for v in m["files"].values()) / 2**20
    print(
        f"{out}: cards of {m['clt']['n_layers']} × {m['clt']['d_sae']} features "
        f"over {m['n_tokens']:,} tokens ({mb:.1f} MiB); "
        f"read one with FeatureStore('{out}').card(layer, feature)"
    )
    return 0


def pick_feature(store, layer: int, max_frequency: float = 0.02) -> int:
    """A feature worth looking at: the most frequent of `layer` among those firing on fewer than
    `max_frequency` of the tokens (dense features are rarely readable)."""
    best, best_count = None, -1
    for f in store.present()[layer].tolist():
        rec = store.record(layer, f)
        if rec and 0 < rec["activation_frequency"] < max_frequency and rec["count"] > best_count:
            best, best_count = f, rec["count"]
    if best is None:
        raise FeatureError(
            f"layer {layer} of {store.dir} has no feature firing on 0–{100 * max_frequency:g}% of "
            "tokens: name one (render STORE LAYER FEATURE)"
        )
    return best


@command
def _tool(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m clt.features",
        description="merge: write the store of an array job whose tasks are done; "
        "render: draw one card as a PNG",
    )
    sub = p.add_subparsers(dest="action", required=True)
    m = sub.add_parser("merge")
    m.add_argument("work", help="the <store>.work directory the tasks wrote")
    r = sub.add_parser("render")
    r.add_argument("store")
    r.add_argument("layer", type=int, nargs="?", help="default: the middle layer")
    r.add_argument(
        "feature",
        type=int,
        nargs="?",
        help="default: the layer's most frequent feature among those firing on < 2%% of tokens",
    )
    r.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    if args.action == "render":
        from .render import render_card
        from .store import FeatureStore

        store = FeatureStore(args.store)
        layer = store.manifest["clt"]["n_layers"] // 2 if args.layer is None else args.layer
        feature = pick_feature(store, layer) if args.feature is None else args.feature
        print(f"wrote {render_card(store.card(layer, feature), args.out)} (layer {layer}, feature {feature})")
        return 0
    from .pipeline import job_of_work

    return run(job_of_work(args.work))


@hydra.main(version_base=None, config_path="../../conf", config_name="features")
def main(cfg: DictConfig) -> None:
    sys.exit(features(cfg))


@command
def features(cfg: DictConfig) -> int:
    return run(load_config(cfg, FeaturesJobConfig))


def entry(argv: list[str]) -> int:
    """`python -m clt.features ARGS`: a first argument without `=` is the checkpoint."""
    if argv and argv[0] in ("merge", "render"):
        return _tool(argv)
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        argv = [f"features.checkpoint={argv[0]}", *argv[1:]]
    sys.argv = [sys.argv[0], *argv]
    main()
    return 0


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1:]))
