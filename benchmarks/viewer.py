"""The viewer on a large synthetic graph, in headless Chromium on this machine, against the same
graph as circuit-tracer-style JSON (ratios in one run).

    python benchmarks/viewer.py                      # 10k nodes, 2M edges
    python benchmarks/viewer.py --nodes 4000 --edges 300000

Measures:
  1. bytes the browser receives: our view (node JSON + binary edges, 12 B/edge) against the
     circuit-tracer graph JSON of the same nodes and edges (what `to_json` writes);
  2. the server's cold start on the graph (load `.pt`, prune, node table, edges), then the first
     paint: navigation start to the graph drawn (`cltViewer.readyAt`, server warm) against the time
     the browser needs only to fetch and `JSON.parse` the circuit-tracer file (its frontend then
     still has to lay it out);
  3. hover latency: mouseover on a node until the highlight (same feature at every position) is
     styled and laid out, median and p90 over 50 nodes; and to the next animation frame (vsync);
  4. page memory: the JS heap after the first paint, against the heap after parsing the JSON.
Appends one JSON line to benchmarks/results/viewer.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path[:] = [
    p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"
]  # kernels.py here is not the kernels package

from clt.attribution.graph import Graph, prune, to_json  # noqa: E402


def synthetic_graph(
    n_nodes: int, n_edges: int, L: int = 16, T: int = 64, K: int = 10, seed: int = 0
) -> Graph:
    """Random DAG in the attribution layout: features (layer, pos) with edges from lower layers
    (features, errors, tokens) to higher ones and to the logits."""
    g = torch.Generator().manual_seed(seed)
    n_sel = n_nodes - L * T - T - K
    assert n_sel > 0
    layer = torch.randint(0, L, (n_sel,), generator=g)
    pos = torch.randint(1, T, (n_sel,), generator=g)
    feat = torch.randperm(1 << 16, generator=g)[:n_sel]
    af = torch.stack([layer, pos, feat], 1)
    af = af[torch.argsort(af[:, 0] * (1 << 24) + af[:, 1] * (1 << 17) + af[:, 2])]
    N = n_nodes
    key = torch.empty(N)  # topological key: tokens −1, features/errors their layer, logits L
    key[:n_sel] = af[:, 0].float()
    key[n_sel : n_sel + L * T] = torch.arange(L).repeat_interleave(T).float()
    key[n_sel + L * T : n_sel + L * T + T] = -1
    key[N - K :] = L
    A = torch.zeros(N, N)
    targets = torch.cat([torch.arange(n_sel), torch.arange(N - K, N)])
    made = 0
    while made < n_edges:
        m = 2 * (n_edges - made)
        t = targets[torch.randint(0, len(targets), (m,), generator=g)]
        s = torch.randint(0, N - K, (m,), generator=g)
        ok = key[s] < key[t]
        t, s = t[ok], s[ok]
        A[t, s] = torch.randn(len(t), generator=g) * torch.rand(len(t), generator=g) ** 3
        made = int((A != 0).sum())
    probs = torch.softmax(torch.randn(K, generator=g), 0).sort(descending=True).values
    return Graph(
        prompt="synthetic",
        input_tokens=torch.arange(T),
        token_strings=[f"t{i}" for i in range(T)],
        active_features=af,
        activation_values=torch.rand(n_sel, generator=g) + 0.1,
        selected_features=torch.arange(n_sel),
        edge_rows=Graph.rows_of(A, n_sel, K),
        logit_tokens=torch.arange(K),
        logit_token_strings=[f"o{i}" for i in range(K)],
        logit_probabilities=probs,
        n_layers=L,
        vocab_size=1000,
        scan="",
        model_name="synthetic",
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--edges", type=int, default=2_000_000)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "viewer.jsonl"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from clt.viewer import CHROMIUM_FLAGS, serve

    tmp = Path(tempfile.mkdtemp(prefix="clt-viewer-bench-"))
    t0 = time.perf_counter()
    graph = synthetic_graph(args.nodes, args.edges)
    graph.to_pt(tmp / "big.pt")
    p = prune(graph, 1.0, 1.0)
    ct = json.dumps(to_json(graph, p, "big", 1.0)).encode()
    (tmp / "big.json").write_bytes(ct)
    n_view_nodes, n_view_edges = int(p.node_mask.sum()), int(p.edge_rows.sum())
    print(
        f"synthetic graph: {graph.n_nodes} nodes, {n_view_edges} edges in the view "
        f"({time.perf_counter() - t0:.1f} s to build); circuit-tracer JSON {len(ct) / 1e6:.1f} MB"
    )
    del p
    srv = serve(str(tmp), quiet=True)
    import urllib.request

    t0 = time.perf_counter()  # the server's part, cold: load graph.pt, prune, node table, edges
    received = {}
    for what in ("graph", "edges"):
        with urllib.request.urlopen(f"{srv.url}api/{what}/big?node_threshold=1&edge_threshold=1") as r:
            received[what] = len(r.read())  # uncompressed (the browser may get the JSON gzipped)
    server_cold = time.perf_counter() - t0
    view_url = f"{srv.url}?slug=big&nt=1&et=1"
    flags = [*CHROMIUM_FLAGS, "--enable-precise-memory-info", "--js-flags=--expose-gc"]
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=shutil.which("chromium"), args=flags)
        page = b.new_page(viewport={"width": 1400, "height": 900})
        page.goto(view_url)
        page.wait_for_selector("#graph[data-ready='1']", timeout=600_000)
        first_paint = page.evaluate("window.cltViewer.readyAt") / 1000
        assert page.locator("#nodes [data-node-id]").count() == n_view_nodes
        page.evaluate("window.gc && window.gc()")
        heap_ours = page.evaluate("performance.memory.usedJSHeapSize")
        hover_ms = page.evaluate("""async () => {
            const ids = window.cltViewer.S.view.nodes.map((n) => n.id);
            const out = [];
            for (let j = 0; j < 50; j++) {
              const id = ids[Math.floor((j * 7919) % ids.length)];
              const e = document.querySelector(`[data-node-id="${id}"]`);
              const t0 = performance.now();
              e.dispatchEvent(new MouseEvent("mouseover", { bubbles: true }));
              e.getBoundingClientRect();  // forces the style and layout of the highlight
              const t1 = performance.now();
              await new Promise((r) => requestAnimationFrame(() => r()));
              out.push([t1 - t0, performance.now() - t0]);
            }
            return out; }""")
        page.close()
        # the same graph as circuit-tracer JSON: fetch + parse only
        page = b.new_page()
        page.goto(srv.url + "api/graphs")
        ct_parse = page.evaluate("""async () => {
            const t0 = performance.now();
            const r = await fetch('/graph_data/big.json', { headers: { 'Accept-Encoding': 'identity' } });
            const text = await r.text();
            const t1 = performance.now();
            window.__g = JSON.parse(text);
            const t2 = performance.now();
            return [(t1 - t0) / 1000, (t2 - t1) / 1000, window.__g.links.length]; }""")
        page.evaluate("window.gc && window.gc()")
        heap_ct = page.evaluate("performance.memory.usedJSHeapSize")
        b.close()
    srv.shutdown()
    ours_bytes = received.get("graph", 0) + received.get("edges", 0)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "nodes": graph.n_nodes,
        "view_edges": n_view_edges,
        "bytes_ours": ours_bytes,
        "bytes_ct_json": len(ct),
        "bytes_ratio_ours_over_ct": ours_bytes / len(ct),
        "server_cold_s": server_cold,
        "first_paint_s": first_paint,
        "ct_fetch_s": ct_parse[0],
        "ct_parse_s": ct_parse[1],
        "first_paint_over_ct_fetch_and_parse": first_paint / (ct_parse[0] + ct_parse[1]),
        "hover_ms_median": statistics.median(h[0] for h in hover_ms),
        "hover_ms_p90": sorted(h[0] for h in hover_ms)[44],
        "hover_to_next_frame_ms_median": statistics.median(h[1] for h in hover_ms),
        "heap_mb_ours": heap_ours / 2**20,
        "heap_mb_ct_parsed": heap_ct / 2**20,
        "heap_ratio": heap_ours / heap_ct,
    }
    print(
        f"bytes to the browser: ours {ours_bytes / 1e6:.1f} MB vs circuit-tracer JSON {len(ct) / 1e6:.1f} MB "
        f"(ratio {result['bytes_ratio_ours_over_ct']:.3f})"
    )
    print(f"server, cold (load, prune, node table, edges): {server_cold:.2f} s")
    print(
        f"first paint {first_paint:.2f} s (server warm) vs fetch+JSON.parse of the JSON "
        f"{ct_parse[0] + ct_parse[1]:.2f} s (ratio {result['first_paint_over_ct_fetch_and_parse']:.2f})"
    )
    print(
        f"hover: median {result['hover_ms_median']:.1f} ms, p90 {result['hover_ms_p90']:.1f} ms "
        f"(highlight drawn); to the next frame {result['hover_to_next_frame_ms_median']:.1f} ms"
    )
    print(
        f"JS heap: ours {result['heap_mb_ours']:.0f} MiB "
        f"vs parsed JSON {result['heap_mb_ct_parsed']:.0f} MiB (ratio {result['heap_ratio']:.3f})"
    )
    with open(args.out, "a") as f:
        f.write(json.dumps(result) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
