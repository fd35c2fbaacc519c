"""`clt serve DIR` and `clt view GRAPH --export FILE` (also `python -m clt.viewer serve|view …`)."""

from __future__ import annotations

import argparse
import sys
import time

from ..config import ATTRIBUTION_DTYPES


def serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clt serve",
        description=(
            "Serve the attribution graphs of DIR (written by clt attribute … --out DIR) in a local, "
            "offline viewer: "
            "the graph, feature cards, pins, supernodes and labels (saved in {slug}.state.json), "
            "server-side pruning, "
            "paths, attribution of new prompts and interventions. circuit-tracer's frontend routes work too."
        ),
    )
    p.add_argument("directory", help="folder of graphs ({slug}.pt + {slug}.json + graph-metadata.json)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument(
        "--clt",
        default=None,
        help="the CLT for new prompts and interventions (default: the one that made the folder's graphs)",
    )
    p.add_argument("--features", default=None, help="feature store for the cards (default: the graphs' scan)")
    p.add_argument("--device", default="auto", help="cpu, cuda, … (auto: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=ATTRIBUTION_DTYPES, help="subject model dtype")
    p.add_argument("--quiet", action="store_true", help="no request log")
    args = p.parse_args(argv)
    from .server import serve

    srv = serve(
        args.directory, args.port, args.host, args.clt, args.features, args.device, args.dtype, args.quiet
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {args.host}: "
            "anyone who can reach it can read these graphs and run the model",
            file=sys.stderr,
        )
    print(f"serving {srv.folder.root} at {srv.url}  (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.shutdown()
    return 0


def view_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="clt view",
        description=(
            "Write one self-contained HTML file of a graph (its pruned view, the cards of its features, "
            "the viewer) "
            "that opens from disk with no server and no network."
        ),
    )
    p.add_argument("graph", help="{slug}.pt written by clt attribute (or its {slug}.json, or the folder)")
    p.add_argument("--export", required=True, help="the HTML file to write")
    p.add_argument("--node-threshold", type=float, default=None, help="default: the saved view's, else 0.8")
    p.add_argument("--edge-threshold", type=float, default=None, help="default: the saved view's, else 0.98")
    p.add_argument("--features", default=None, help="feature store (default: the graph's scan)")
    args = p.parse_args(argv)
    from .export import export_html
    from .graphs import thresholds

    nt, et = thresholds(
        {"node_threshold": args.node_threshold or 0.8, "edge_threshold": args.edge_threshold or 0.98}
    )
    out = export_html(
        args.graph, args.export, args.node_threshold and nt, args.edge_threshold and et, args.features
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m clt.viewer serve|view …`: the same as `clt serve|view …` (its error handling)."""
    from ..cli import main as clt_main

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("serve", "view"):
        print("usage: python -m clt.viewer {serve,view} …", file=sys.stderr)
        return 2
    return clt_main(argv)


if __name__ == "__main__":
    sys.exit(main())
