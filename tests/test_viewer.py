"""The viewer's server with plain HTTP clients: loopback, gzip, ETag, Range, path containment,
concurrency, the sidecar state (bad input changes nothing, kill -9 never tears it), server-side
pruning against `prune`, paths against brute force, circuit-tracer's routes and schema, attribution
and interventions against the library, bad input, and the single-file export."""

from __future__ import annotations

import gzip
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from clt.attribution import Graph, Intervention, attribute, prune, scores
from clt.attribution.graph import graph_scores, json_nodes
from clt.viewer.state import validate_state

REPO = Path(__file__).resolve().parents[1]


def request(srv, method: str, path: str, body=None, headers: dict | None = None):
    host, port = srv.server_address[:2] if hasattr(srv, "server_address") else srv
    c = http.client.HTTPConnection(host, port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    c.request(method, path, body=data, headers=headers or {})
    r = c.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    c.close()
    return out


def get_json(srv, path: str):
    status, _, body = request(srv, "GET", path)
    assert status == 200, body[:500]
    return json.loads(body)


def decode_edges(blob: bytes):
    assert blob[:4] == b"CLTE"
    (n,) = struct.unpack("<I", blob[4:8])
    assert len(blob) == 8 + 12 * n
    src = torch.frombuffer(bytearray(blob[8 : 8 + 4 * n]), dtype=torch.int32)
    dst = torch.frombuffer(bytearray(blob[8 + 4 * n : 8 + 8 * n]), dtype=torch.int32)
    w = torch.frombuffer(bytearray(blob[8 + 8 * n :]), dtype=torch.float32)
    return src, dst, w


# ---------------------------------------------------------------------------------------------
# HTTP


def test_binds_loopback_and_a_free_port_by_default(folder):
    proc = subprocess.Popen(
        [sys.executable, "-m", "clt.cli", "serve", str(folder), "--quiet"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line + proc.stderr.read()
        port = int(m.group(1))
        assert port > 0
        assert request(("127.0.0.1", port), "GET", "/api/graphs")[0] == 200
        # not reachable on another interface of this machine
        try:
            others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        except socket.gaierror:
            others = set()
        others -= {"127.0.0.1"}
        for host in others:
            with pytest.raises(OSError):
                socket.create_connection((host, port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_files_gzip_etag(srv, folder):
    status, h, body = request(srv, "GET", "/graph_data/capitals.json")
    assert status == 200 and body == (folder / "capitals.json").read_bytes() and "ETag" in h
    status, h2, zipped = request(srv, "GET", "/graph_data/capitals.json", headers={"Accept-Encoding": "gzip"})
    assert status == 200 and h2["Content-Encoding"] == "gzip" and gzip.decompress(zipped) == body
    assert len(zipped) < len(body)
    status, _, none = request(srv, "GET", "/graph_data/capitals.json", headers={"If-None-Match": h["ETag"]})
    assert status == 304 and none == b""
    status, _, meta = request(srv, "GET", "/data/graph-metadata.json")
    assert status == 200 and json.loads(meta)["graphs"][0]["slug"] == "capitals"


def test_ranges_are_exact_and_out_of_range_is_416(srv, viewer_folder):
    blob = (viewer_folder.store / "layer_0.bin").read_bytes()
    n = len(blob)
    status, h, body = request(srv, "GET", "/features/layer_0.bin", headers={"Range": "bytes=10-99"})
    assert status == 206 and body == blob[10:100] and h["Content-Range"] == f"bytes 10-99/{n}"
    status, _, body = request(srv, "GET", "/features/layer_0.bin", headers={"Range": "bytes=-7"})
    assert status == 206 and body == blob[-7:]
    status, _, body = request(srv, "GET", "/features/layer_0.bin", headers={"Range": f"bytes={n - 3}-"})
    assert status == 206 and body == blob[-3:]
    status, h, _ = request(srv, "GET", "/features/layer_0.bin", headers={"Range": f"bytes={n}-{n + 10}"})
    assert status == 416 and h["Content-Range"] == f"bytes */{n}"
    status, _, body = request(srv, "GET", "/features/index.json.gz")
    assert status == 200 and json.loads(gzip.decompress(body))["0"]["filename"] == "layer_0.bin"


@pytest.mark.parametrize(
    "path",
    [
        "/features/../../../etc/passwd",
        "/data/%2e%2e/%2e%2e/etc/passwd",
        "/graph_data/..%2f..%2fclt/config.json",
        "/static/..%2fserver.py",
        "/data//etc/passwd",
        "/static/%2e%2e/__init__.py",
        "/data/capitals.json%00",
        "/api/graph/..%2fcapitals",
    ],
)
def test_traversal_is_refused(srv, path):
    status, _, body = request(srv, "GET", path)
    assert status in (403, 404), body[:200]


def test_unknown_slug_is_404(srv):
    for path in ("/api/graph/nope", "/graph_data/nope.json", "/api/card/nope?node=x", "/api/state/nope"):
        assert request(srv, "GET", path)[0] == 404, path
    assert request(srv, "GET", "/api/card/capitals?node=9_9_9")[0] == 404


def test_two_slow_requests_are_served_concurrently(srv):
    """Two clients that send their requests slowly hold two connections; a third request is still
    answered at once, and then both slow ones are."""
    host, port = srv.server_address[:2]
    slow = [socket.create_connection((host, port), timeout=10) for _ in range(2)]
    for s in slow:
        s.sendall(b"GET /api/graph/capitals HTTP/1.1\r\nHost: x\r\n")  # headers not finished
    t0 = time.perf_counter()
    assert request(srv, "GET", "/api/graphs")[0] == 200
    assert time.perf_counter() - t0 < 5
    for s in slow:
        s.sendall(b"Connection: close\r\n\r\n")
    for s in slow:
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        s.close()


# ---------------------------------------------------------------------------------------------
# Server-side pruning, neighbours, paths, scores


@pytest.mark.parametrize("nt,et", [(0.8, 0.98), (0.5, 0.9), (1.0, 1.0)])
def test_view_is_exactly_prune(srv, graph, nt, et):
    view = get_json(srv, f"/api/graph/capitals?node_threshold={nt}&edge_threshold={et}")
    p = prune(graph, nt, et)
    kept = json_nodes(graph, p)
    assert [n["id"] for n in view["nodes"]] == [kept[i]["node_id"] for i in sorted(kept)]
    _, _, blob = request(srv, "GET", f"/api/edges/capitals?node_threshold={nt}&edge_threshold={et}")
    src, dst, w = decode_edges(blob)
    index = p.node_mask.nonzero().flatten()
    got = sorted(zip(index[dst.long()].tolist(), index[src.long()].tolist()))
    want = sorted(map(tuple, p.edge_mask.nonzero().tolist()))
    assert got == want and view["n_edges"] == int(p.edge_mask.sum())
    torch.testing.assert_close(w, graph.adjacency_matrix[index[dst.long()], index[src.long()]])
    s = scores(graph, p)
    for k in ("pruned/replacement_score", "pruned/completeness_score", "full/replacement_score"):
        assert view["scores"][k] == pytest.approx(s[k])


def test_bad_thresholds_are_400(srv):
    for q in ("node_threshold=0", "edge_threshold=1.5", "node_threshold=abc"):
        status, _, body = request(srv, "GET", f"/api/graph/capitals?{q}")
        assert status == 400 and "threshold" in json.loads(body)["error"]


def test_neighbours_are_the_strongest_entries_of_the_adjacency(srv, graph):
    view = get_json(srv, "/api/graph/capitals")
    ids = {n["node_id"]: i for i, n in json_nodes(graph, prune(graph, 1.0, 1.0)).items()}
    feat = next(n for n in view["nodes"] if n["kind"] == "feature")
    nb = get_json(srv, f"/api/neighbors/capitals?node={feat['id']}&k=5")
    row = graph.adjacency_matrix[ids[feat["id"]]]
    want = row.abs().topk(5).indices.tolist()
    assert [ids[x["id"]] for x in nb["inputs"]] == [j for j in want if row[j] != 0]
    col = graph.adjacency_matrix[:, ids[feat["id"]]]
    assert [x["weight"] for x in nb["outputs"]] == pytest.approx(
        col[col.abs().topk(len(nb["outputs"])).indices].tolist()
    )


def brute_force_paths(view, src, dst, w_hat, start, goal):
    out_edges: dict[int, list[tuple[int, float]]] = {}
    for s, d, w in zip(src, dst, w_hat):
        if w > 0:
            out_edges.setdefault(s, []).append((d, w))
    found = []

    def walk(node, path, strength):
        if node == goal:
            found.append((strength, path))
            return
        for d, w in out_edges.get(node, []):
            walk(d, path + [d], strength * w)

    walk(start, [start], 1.0)
    return sorted(found, key=lambda x: -x[0])


def test_k_best_paths_equal_brute_force(srv, graph):
    from clt.attribution.graph import normalize_matrix

    nt, et = 0.9, 0.95
    view = get_json(srv, f"/api/graph/capitals?node_threshold={nt}&edge_threshold={et}")
    _, _, blob = request(srv, "GET", f"/api/edges/capitals?node_threshold={nt}&edge_threshold={et}")
    src, dst, _ = decode_edges(blob)
    index = prune(graph, nt, et).node_mask.nonzero().flatten()
    A_hat = normalize_matrix(graph.adjacency_matrix)
    w_hat = A_hat[index[dst.long()], index[src.long()]].tolist()
    nodes = view["nodes"]
    start = max(i for i, n in enumerate(nodes) if n["kind"] == "embedding")
    goal = next(i for i, n in enumerate(nodes) if n["kind"] == "logit")
    want = brute_force_paths(view, src.tolist(), dst.tolist(), w_hat, start, goal)[:5]
    got = get_json(
        srv,
        f"/api/paths/capitals?from={nodes[start]['id']}&to={nodes[goal]['id']}&k=5"
        f"&node_threshold={nt}&edge_threshold={et}",
    )["paths"]
    assert len(want) >= 2 and len(got) == len(want)
    assert [p["strength"] for p in got] == pytest.approx([s for s, _ in want], rel=1e-4)
    assert [p["nodes"] for p in got] == [[nodes[i]["id"] for i in path] for _, path in want]


def reduced_replacement_score(graph, keep: set[int]) -> float:
    """Independent reference (float64 matrix inverse): the features not kept are merged into the
    error node of their (layer, position); replacement = token share of the influence on the logits."""
    import numpy as np

    A = graph.adjacency_matrix.double().numpy().copy()
    nf, T = graph.n_features, graph.n_pos
    for j in range(nf):
        if j not in keep:
            layer, pos, _ = graph.feature_of(j)
            A[:, nf + layer * T + pos] += A[:, j]
            A[:, j] = 0
            A[j] = 0
    M = np.abs(A)
    M = M / np.maximum(M.sum(1, keepdims=True), 1e-10)
    w = graph.logit_weights().double().numpy()
    infl = w @ (np.linalg.inv(np.eye(len(A)) - M) - np.eye(len(A)))
    tok, err = infl[graph.token_slice].sum(), infl[graph.error_slice].sum()
    return tok / (tok + err)


def test_subgraph_scores(srv, graph):
    view = get_json(srv, "/api/graph/capitals?node_threshold=1&edge_threshold=1")
    every = [n["id"] for n in view["nodes"] if n["kind"] == "feature"]
    assert len(every) == graph.n_features
    s = json.loads(request(srv, "POST", "/api/scores/capitals", {"pinned": every})[2])
    full = graph_scores(graph)
    assert s["replacement_score"] == pytest.approx(full["replacement_score"])
    assert s["completeness_score"] == pytest.approx(full["completeness_score"])
    for pinned in ([], every[:2], every[1::2]):
        r = json.loads(request(srv, "POST", "/api/scores/capitals", {"pinned": pinned})[2])
        keep = {i for i in range(graph.n_features) if view["nodes"][i]["id"] in pinned}
        assert r["n_features"] == len(pinned)
        assert r["replacement_score"] == pytest.approx(reduced_replacement_score(graph, keep), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# The sidecar state


def valid_state(srv, **kw):
    view = get_json(srv, "/api/graph/capitals")
    ids = [n["id"] for n in view["nodes"]]
    st = {
        "format": "clt-viewer-state",
        "version": 1,
        "slug": "capitals",
        "pinned": ids[:3],
        "supernodes": [{"label": "pair", "members": ids[:2]}],
        "labels": {"features": {"0/1": "one"}, "nodes": {}},
        "clicked": ids[0],
        "node_threshold": 0.8,
        "edge_threshold": 0.98,
        "positions": {},
    }
    return st | kw


def test_state_round_trip_and_bad_posts_change_nothing(srv, folder):
    graph_bytes = (folder / "capitals.json").read_bytes()
    st = valid_state(srv)
    status, _, body = request(srv, "POST", "/api/state/capitals", st)
    assert status == 200, body
    path = folder / "capitals.state.json"
    saved = path.read_bytes()
    assert json.loads(saved) == st and get_json(srv, "/api/state/capitals") == st
    bad = [
        b"{not json",
        json.dumps(st | {"pinned": ["no_such_node"]}).encode(),
        json.dumps(st | {"supernodes": [{"label": "x", "members": [st["pinned"][0]]}]}).encode(),
        json.dumps(st | {"extra": 1}).encode(),
        json.dumps(st | {"node_threshold": 2}).encode(),
        json.dumps(st | {"slug": "other"}).encode(),
        json.dumps([1, 2]).encode(),
    ]
    for b in bad:
        status, _, body = request(srv, "POST", "/api/state/capitals", b, {"Content-Type": "application/json"})
        assert status == 400 and json.loads(body)["error"], b
        assert path.read_bytes() == saved
    assert (folder / "capitals.json").read_bytes() == graph_bytes  # the graph is never rewritten


def test_circuit_tracer_save_goes_to_the_sidecar(srv, folder):
    """circuit-tracer's Save button posts URL strings (pinnedIds comma-joined, supernodes as JSON)."""
    graph_bytes = (folder / "capitals.json").read_bytes()
    ids = [n["id"] for n in get_json(srv, "/api/graph/capitals")["nodes"]]
    q = {
        "pinnedIds": ",".join(ids[:2]),
        "supernodes": json.dumps([["grp", ids[2], ids[3]]]),
        "clickedId": ids[1],
    }
    status, _, body = request(srv, "POST", "/save_graph/capitals", {"qParams": q, "timestamp": 1})
    assert status == 200, body
    st = json.loads((folder / "capitals.state.json").read_text())
    assert st["pinned"] == ids[:4] and st["supernodes"] == [{"label": "grp", "members": ids[2:4]}]
    assert (folder / "capitals.json").read_bytes() == graph_bytes


def test_kill_9_during_saves_leaves_an_old_or_new_sidecar(folder, tmp_path):
    d = tmp_path / "graphs"
    shutil.copytree(folder, d)
    (d / "capitals.state.json").unlink(missing_ok=True)
    ids = [
        n["node_id"]
        for n in json_nodes(
            Graph.from_pt(d / "capitals.pt"), prune(Graph.from_pt(d / "capitals.pt"), 1, 1)
        ).values()
    ]

    def state(version: int) -> dict:  # ~3 MB, so that a write takes a while
        labels = {f"{i % 3}/{i}": f"v{version} " + "x" * 150 for i in range(20_000)}
        return {
            "pinned": ids[:2],
            "labels": {"features": labels, "nodes": {}},
            "clicked": ids[version % len(ids)],
        }

    written = {}
    for trial in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-m", "clt.viewer", "serve", str(d), "--quiet"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        port = int(re.search(r":(\d+)/", proc.stdout.readline()).group(1))
        stop = threading.Event()

        def post_loop(trial=trial, port=port, stop=stop):
            v = trial * 1000
            while not stop.is_set():
                v += 1
                body = state(v)
                written[v] = body
                try:
                    request(("127.0.0.1", port), "POST", "/api/state/capitals", body)
                except OSError:
                    return

        t = threading.Thread(target=post_loop, daemon=True)
        t.start()
        time.sleep(1.0 + 0.37 * trial)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        stop.set()
        t.join(10)
        path = d / "capitals.state.json"
        if path.exists():
            got = json.loads(path.read_text())  # never torn
            v = int(got["labels"]["features"]["0/0"].split()[0][1:])
            assert validate_state(written[v], "capitals", set(ids)) == got
    assert path.exists()


# ---------------------------------------------------------------------------------------------
# circuit-tracer compatibility


def test_the_folder_loads_in_circuit_tracers_server(folder, viewer_folder):
    """circuit-tracer's own local server serves the folder that clt attribute wrote; its pydantic
    models accept the graph file, and the scan names the store that our /features/ route serves."""
    from circuit_tracer.frontend import local_server
    from circuit_tracer.frontend.graph_models import Model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ct = local_server.serve(data_dir=str(folder), port=port)
    try:
        meta = json.loads(request(("127.0.0.1", port), "GET", "/data/graph-metadata.json")[2])
        slug = meta["graphs"][0]["slug"]
        status, h, body = request(("127.0.0.1", port), "GET", f"/graph_data/{slug}.json")
        assert status == 200
        if h.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        data = json.loads(body)
        Model.model_validate(data)
        scan = data["metadata"]["scan"]
        assert scan.startswith("/") and Path(scan) == viewer_folder.store.resolve()
    finally:
        ct.stop()


# ---------------------------------------------------------------------------------------------
# Attribution and interventions through the API; bad input


def wait_job(srv, job: dict, timeout: float = 300) -> dict:
    t0 = time.time()
    while job["state"] in ("queued", "running"):
        assert time.time() - t0 < timeout
        time.sleep(0.2)
        job = get_json(srv, f"/api/job/{job['id']}")
    return job


def test_attribute_from_the_api_gives_the_graph_of_attribute(srv, folder, rm):
    status, _, body = request(srv, "POST", "/api/attribute", {"prompt": "The dog chased the cat"})
    assert status == 202, body
    job = wait_job(srv, json.loads(body))
    assert job["state"] == "done" and job["total"] > 0 and job["done"] == job["total"], job
    got = Graph.from_pt(folder / f"{job['slug']}.pt")
    want = attribute("The dog chased the cat", rm.clt, rm, verbose=False)
    assert torch.equal(got.active_features, want.active_features)
    torch.testing.assert_close(got.adjacency_matrix, want.adjacency_matrix, rtol=1e-4, atol=1e-6)
    assert job["slug"] in [g["slug"] for g in get_json(srv, "/api/graphs")["graphs"]]
    assert (folder / f"{job['slug']}.json").exists()


def test_a_one_token_prompt_gives_a_graph_with_its_nodes(srv):
    """circuit-tracer's frontend renders a 1-token graph empty (its dense-feature filter drops every
    node); ours keeps the token, its features and the logits."""
    status, _, body = request(srv, "POST", "/api/attribute", {"prompt": "Hello", "slug": "one-token"})
    assert status == 202, body
    job = wait_job(srv, json.loads(body))
    assert job["state"] == "done", job
    view = get_json(srv, "/api/graph/one-token")
    kinds = [n["kind"] for n in view["nodes"]]
    assert view["tokens"][1:] == ["Hello"] and kinds.count("embedding") == 2 and "logit" in kinds


@pytest.mark.parametrize("mode", ["constrained", "free"])
def test_intervene_from_the_api_gives_the_logits_of_intervene(srv, graph, rm, mode):
    view = get_json(srv, "/api/graph/capitals")
    feats = [n for n in view["nodes"] if n["kind"] == "feature"][:2]
    body = {
        "slug": "capitals",
        "mode": mode,
        "max_new_tokens": 4,
        "interventions": [
            {"node": feats[0]["id"], "op": "scale", "value": 0.0},
            {"node": feats[1]["id"], "op": "set", "value": 3.0},
        ],
    }
    status, _, out = request(srv, "POST", "/api/intervene", body)
    assert status == 200, out
    r = json.loads(out)
    ivs = [
        Intervention(feats[0]["layer"], feats[0]["pos"], feats[0]["feature"], 0.0, "scale"),
        Intervention(feats[1]["layer"], feats[1]["pos"], feats[1]["feature"], 3.0, "set"),
    ]
    logits = rm.intervene(graph.input_tokens, ivs, mode=mode)[-1]
    p = logits.softmax(-1)
    assert [x["id"] for x in r["after"]] == p.topk(10).indices.tolist()
    assert [x["prob"] for x in r["after"]] == pytest.approx(p.topk(10).values.tolist(), rel=1e-4, abs=1e-7)
    text, _, _ = rm.generate(graph.input_tokens, ivs, max_new_tokens=4)
    assert r["continuation"] == text


def test_bad_input_is_a_clear_message_and_the_server_keeps_serving(srv, folder, viewer_folder, rm, capfd):
    srv.quiet = False  # the log goes to stderr: each error is one line there too
    capfd.readouterr()

    def post(path, body):
        status, _, out = request(srv, "POST", path, body)
        return status, json.loads(out)["error"]

    feat = next(n for n in get_json(srv, "/api/graph/capitals")["nodes"] if n["kind"] == "feature")
    # an unknown feature
    status, err = post(
        "/api/intervene",
        {"slug": "capitals", "interventions": [{"layer": 0, "position": 1, "feature": 999, "value": 1}]},
    )
    assert status == 400 and "999" in err and "48 features" in err
    status, err = post(
        "/api/intervene", {"slug": "capitals", "interventions": [{"node": "E_1_0", "value": 1}]}
    )
    assert status in (400, 404)
    # a prompt longer than the context
    status, err = post("/api/attribute", {"prompt": "word " * 600})
    assert status == 400 and "context" in err
    # a truncated graph file, a corrupt one
    blob = (folder / "capitals.pt").read_bytes()
    (folder / "cut.pt").write_bytes(blob[: len(blob) // 2])
    (folder / "junk.pt").write_bytes(b"\x00garbage" * 100)
    for slug in ("cut", "junk"):
        status, _, out = request(srv, "GET", f"/api/graph/{slug}")
        assert status == 422 and "cannot be read" in json.loads(out)["error"]
    # a graph made with another CLT
    g = Graph.from_pt(folder / "capitals.pt")
    g.info["clt_checksum"] = "0" * 64
    g.to_pt(folder / "other.pt")
    status, err = post(
        "/api/intervene", {"slug": "other", "interventions": [{"node": feat["id"], "value": 0}]}
    )
    assert status == 409 and "another CLT" in err
    assert request(srv, "GET", "/api/graphs")[0] == 200  # still serving
    for slug in ("cut", "junk", "other"):
        (folder / f"{slug}.pt").unlink()
    srv.quiet = True
    log = capfd.readouterr().err
    for needle in (
        "error 400: POST /api/intervene",
        "48 features",
        "error 400: POST /api/attribute",
        "model's context",
        "error 422: GET /api/graph/cut",
        "cannot be read",
        "error 409",
        "another CLT",
    ):
        assert needle in log, (needle, log[-2000:])
    assert "Traceback" not in log


# ---------------------------------------------------------------------------------------------
# Offline guard and the export


def test_packaged_assets_reference_nothing_remote():
    static = REPO / "clt" / "viewer" / "static"
    for p in static.iterdir():
        text = p.read_text()
        assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", text), p
        assert not re.search(r"""(fetch|import)\s*\(\s*["'`]\s*(https?:)?//""", text), p
        assert not re.search(r"""from\s+["'](https?:)?//""", text), p
        hosts = re.findall(r"https?://([^/\"'\s)]+)", text)
        assert set(hosts) <= {"www.w3.org"}, (p, hosts)  # the SVG namespace name, never fetched


def test_export_is_one_file_with_the_view_and_its_cards(folder, graph, tmp_path):
    out = tmp_path / "graph.html"
    proc = subprocess.run(
        [sys.executable, "-m", "clt.cli", "view", str(folder / "capitals.pt"), "--export", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    html = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", html)
    assert "/static/" not in html and "connect-src 'none'" in html
    data = json.loads(
        re.search(r'<script id="clt-data" type="application/json">(.*?)</script>', html, re.S)
        .group(1)
        .replace("<\\/", "</")
    )
    p = prune(graph, 0.8, 0.98)
    assert len(data["view"]["nodes"]) == int(p.node_mask.sum())
    feats = [n for n in data["view"]["nodes"] if n["kind"] == "feature"]
    assert feats and all(data["cards"][n["id"]]["card"]["layer"] == n["layer"] for n in feats)
    # bad input: one line, exit 2, nothing written
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "clt.cli",
            "view",
            str(tmp_path / "none.pt"),
            "--export",
            str(tmp_path / "x.html"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and not (tmp_path / "x.html").exists()
    assert len(bad.stderr.strip().splitlines()) == 1
    assert math.isfinite(len(html))
