"""The viewer in a real browser: Debian's Chromium, headless, driven by Playwright. Every request
that does not go to 127.0.0.1 (or file:// for the export) is blocked and counted, and any console
error or page error fails the test. Screenshots go to test-artifacts/viewer/.

CI (.ci/run) installs Chromium and sets CLT_REQUIRE_BROWSER=1, so these tests run there instead of
skipping."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clt.attribution import Graph, Intervention, attribute, prune
from clt.attribution.graph import json_nodes
from clt.viewer import CHROMIUM_FLAGS

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "viewer"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

try:
    import playwright.sync_api as pw
except ImportError:  # pragma: no cover
    pw = None

if (pw is None or CHROMIUM is None) and os.environ.get("CLT_REQUIRE_BROWSER") == "1":
    raise RuntimeError(
        "CLT_REQUIRE_BROWSER=1 but Chromium or Playwright is missing (apt-get install chromium)"
    )
pytestmark = pytest.mark.skipif(pw is None or CHROMIUM is None, reason="needs Chromium and Playwright")


@pytest.fixture(scope="module")
def browser():
    """Playwright's launch() starts Chromium on a fresh temporary profile (its own user-data dir)."""
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield b
        b.close()


class Page:
    """A fresh context and page; remote requests blocked, console errors collected."""

    def __init__(self, browser, allow_file: bool = False, allowed_errors: tuple[str, ...] = ()):
        self.ctx = browser.new_context(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.blocked: list[str] = []
        self.allowed = allowed_errors

        def route(r):
            url = r.request.url
            if url.startswith("http://127.0.0.1:") or (allow_file and url.startswith(("file://", "data:"))):
                r.continue_()
            else:
                self.blocked.append(url)
                r.abort()

        self.ctx.route("**/*", route)
        self.page = self.ctx.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def check(self):
        bad = [e for e in self.errors if not any(a in e for a in self.allowed)]
        assert not bad, bad
        assert not self.blocked, self.blocked

    def shot(self, name: str):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    def close(self):
        self.ctx.close()


@pytest.fixture
def page(browser):
    p = Page(browser)
    yield p
    p.check()
    p.close()


@pytest.fixture(autouse=True)
def fresh_state(folder):
    """Every test starts from a graph with no saved view state."""
    for p in folder.glob("*.state.json"):
        p.unlink()


def open_graph(p: Page, url: str):
    p.page.goto(url)
    p.page.wait_for_selector("#graph[data-ready='1']", timeout=20_000)


def wait_js(pg, expression: str, timeout: float = 10_000):
    """Poll a JS expression until truthy (Playwright's wait_for_function evaluates strings, which the
    viewer's Content-Security-Policy forbids; page.evaluate does not)."""
    t0 = time.time()
    while not pg.evaluate(expression):
        assert time.time() - t0 < timeout / 1000, f"timed out waiting for {expression}"
        time.sleep(0.05)


def n_nodes(p: Page) -> int:
    return p.page.locator("#nodes [data-node-id]").count()


def wait_count(p: Page, n: int, timeout: float = 10):
    t0 = time.time()
    while n_nodes(p) != n or p.page.get_attribute("#graph", "data-ready") != "1":
        assert time.time() - t0 < timeout, (n_nodes(p), n)
        time.sleep(0.05)


def test_renders_offline_and_the_slider_re_prunes_nodes_and_edges(page, srv, graph):
    open_graph(page, srv.url)
    p = prune(graph, 0.8, 0.98)
    assert n_nodes(page) == int(p.node_mask.sum())
    assert page.page.get_attribute("#graph", "data-edges") == str(int(p.edge_mask.sum()))
    tokens = page.page.locator("#axes .tok").evaluate_all("(es) => es.map((e) => e.textContent)")
    assert len(tokens) == graph.n_pos and "capital" in "".join(tokens)
    page.shot("graph")
    for nt, et in ((0.5, 0.98), (0.5, 0.7), (1.0, 1.0)):
        page.page.eval_on_selector(
            "#node-slider", f"(e) => {{ e.value = {nt}; e.dispatchEvent(new Event('input')); }}"
        )
        page.page.eval_on_selector(
            "#edge-slider", f"(e) => {{ e.value = {et}; e.dispatchEvent(new Event('input')); }}"
        )
        q = prune(graph, nt, et)
        t0 = time.time()
        while page.page.get_attribute("#graph", "data-edges") != str(int(q.edge_mask.sum())) or n_nodes(
            page
        ) != int(q.node_mask.sum()):
            assert time.time() - t0 < 10, (n_nodes(page), int(q.node_mask.sum()))
            time.sleep(0.05)
        assert f"nt={nt:g}" in page.page.url and f"et={et:g}" in page.page.url
    assert f"{int(q.edge_mask.sum())} edges" in page.page.inner_text("#counts")


def feature_nodes(srv, nt=0.8, et=0.98):
    import urllib.request

    with urllib.request.urlopen(f"{srv.url}api/graph/capitals?node_threshold={nt}&edge_threshold={et}") as r:
        return [n for n in json.loads(r.read())["nodes"] if n["kind"] == "feature"]


def test_clicking_a_feature_shows_its_card(page, srv, viewer_folder):
    from clt.features import FeatureStore

    open_graph(page, srv.url)
    n = feature_nodes(srv)[0]
    rec = FeatureStore(viewer_folder.store).record(n["layer"], n["feature"])
    t0 = time.perf_counter()
    page.page.click(f"#nodes [data-node-id='{n['id']}']")
    page.page.wait_for_selector("#card-body .example", timeout=5000)
    assert time.perf_counter() - t0 < 3
    assert page.page.inner_text("#card-title").startswith(f"L{n['layer']} #{n['feature']} @{n['pos']}")
    assert f"Act: {n['activation']:.3f}" in page.page.inner_text("#card-act")
    ex = rec["examples_quantiles"][0]["examples"][0]
    first = page.page.locator("#card-body .group").first.locator(".example").first
    shown = ex["tokens"][ex["train_token_ind"]].replace("\n", "⏎")
    assert first.locator(".peak").inner_text() == shown
    chips = page.page.locator(".logit-chip.top").evaluate_all(
        "(es) => es.map((e) => e.firstChild.textContent)"
    )
    assert chips == [t.replace("\n", "⏎") for t in rec["top_logits"]]
    assert page.page.locator(".hist .bar").count() == len(rec["histogram"])
    assert page.page.locator(".hist .current").count() == 1
    page.shot("card")
    # an error node has no card, only its edges
    err = next(
        x
        for x in json.loads(page.page.evaluate("JSON.stringify(window.cltViewer.S.view.nodes)"))
        if x["kind"] == "error"
    )
    page.page.click(f"#nodes [data-node-id='{err['id']}']")
    page.page.wait_for_selector(f"#label-input[data-node-id='{err['id']}']")  # its card replaced the last
    page.page.wait_for_selector("#card-body h3")
    assert page.page.locator("#card-body .example").count() == 0


def test_hover_highlights_the_feature_at_every_position(page, srv):
    open_graph(page, srv.url + "?slug=capitals&nt=1&et=1")
    feats = feature_nodes(srv, 1, 1)
    groups: dict[tuple, list] = {}
    for n in feats:
        groups.setdefault((n["layer"], n["feature"]), []).append(n["id"])
    key, ids = max(groups.items(), key=lambda kv: len(kv[1]))
    assert len(ids) >= 2
    page.page.hover(f"#nodes [data-node-id='{ids[0]}']")
    lit = page.page.locator("#nodes .same-feature").evaluate_all("(es) => es.map((e) => e.dataset.nodeId)")
    assert sorted(lit) == sorted(ids)


def test_pins_supernode_and_label_survive_a_reload_and_a_fresh_context(browser, srv, folder):
    p = Page(browser)
    open_graph(p, srv.url + "?slug=capitals")
    feats = feature_nodes(srv)
    view = json.loads(p.page.evaluate("JSON.stringify(window.cltViewer.S.view.nodes)"))
    others = [n["id"] for n in view if n["kind"] == "error"]
    pins = [feats[0]["id"], feats[1]["id"], others[0]]
    for nid in pins:
        p.page.click(f"#nodes [data-node-id='{nid}']", modifiers=["Control"])
    assert p.page.evaluate("window.cltViewer.S.pinned") == pins
    for nid in pins[:2]:
        p.page.click(f"#subgraph .sg-node[data-key='{nid}']")
    p.page.fill("#sn-label", "capital pair")
    p.page.click("#group-btn")
    p.page.click(f"#nodes [data-node-id='{feats[0]['id']}']")
    label_input = f"#label-input[data-node-id='{feats[0]['id']}']"  # this node's card, not the last one's
    p.page.wait_for_selector(label_input)
    p.page.fill(label_input, "says capital")
    p.page.press(label_input, "Enter")
    wait_js(p.page, "document.getElementById('save-status').textContent === 'saved ✓'")
    saved = json.loads((folder / "capitals.state.json").read_text())
    assert saved["pinned"] == pins and saved["supernodes"] == [{"label": "capital pair", "members": pins[:2]}]
    label_key = f"{feats[0]['layer']}/{feats[0]['feature']}"
    assert saved["labels"]["features"][label_key] == "says capital"
    url = p.page.url
    p.shot("subgraph")

    def check(pg: Page):
        s = json.loads(
            pg.page.evaluate(
                "JSON.stringify({pinned: window.cltViewer.S.pinned, "
                "sn: window.cltViewer.S.supernodes, labels: window.cltViewer.S.labels})"
            )
        )
        assert s["pinned"] == pins and s["sn"] == [{"label": "capital pair", "members": pins[:2]}]
        assert s["labels"]["features"][label_key] == "says capital"
        assert pg.page.locator("#subgraph .sg-node.supernode").count() == 1
        assert "capital pair" in pg.page.text_content("#subgraph")
        assert pg.page.locator("#nodes .pinned").count() == 3
        assert pg.page.input_value("#supernode-list .sn-label") == "capital pair"

    p.page.reload()
    p.page.wait_for_selector("#graph[data-ready='1']")
    check(p)
    p.check()
    p.close()
    fresh = Page(browser)  # a new browser context: nothing but the URL and the sidecar
    open_graph(fresh, url)
    check(fresh)
    fresh.check()
    fresh.close()


def test_search_selects_and_centres_a_node(page, srv):
    open_graph(page, srv.url + "?slug=capitals")
    n = feature_nodes(srv)[-1]
    page.page.fill("#search", f"L{n['layer']}/{n['feature']}")
    page.page.press("#search", "Enter")
    wait_js(page.page, f"window.cltViewer.S.clicked === '{n['id']}'")
    box = page.page.locator(f"#nodes [data-node-id='{n['id']}']").bounding_box()
    pane = page.page.locator("#graph").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    assert abs(cx - (pane["x"] + pane["width"] / 2)) < 3 and abs(cy - (pane["y"] + pane["height"] / 2)) < 3
    assert page.page.inner_text("#card-title").startswith(f"L{n['layer']} #{n['feature']}")
    # a logit token
    page.page.fill("#search", "zzz-no-such-thing")
    page.page.press("#search", "Enter")
    wait_js(page.page, "document.getElementById('search-status').textContent === 'no match'")


def test_attribute_a_prompt_from_the_page(page, srv, folder, rm):
    open_graph(page, srv.url + "?slug=capitals")
    page.page.fill("#prompt-input", "Cats and dogs are")
    page.page.click("#attribute-btn")
    wait_js(
        page.page,
        "window.cltViewer.S.view.slug === 'cats-and-dogs-are' && "
        "document.getElementById('graph').dataset.ready === '1'",
        timeout=120_000,
    )
    got = Graph.from_pt(folder / "cats-and-dogs-are.pt")
    want = attribute("Cats and dogs are", rm.clt, rm, verbose=False)
    assert torch.equal(got.active_features, want.active_features)
    torch.testing.assert_close(got.adjacency_matrix, want.adjacency_matrix, rtol=1e-4, atol=1e-6)
    nt, et = page.page.evaluate("[window.cltViewer.S.nt, window.cltViewer.S.et]")
    assert (nt, et) == (0.8, 0.98)
    assert n_nodes(page) == int(prune(want, nt, et).node_mask.sum())
    assert page.page.input_value("#graph-select") == "cats-and-dogs-are"
    page.shot("attributed")


def test_intervene_from_the_page(page, srv, graph, rm):
    open_graph(page, srv.url + "?slug=capitals")
    n = feature_nodes(srv)[0]
    page.page.click(f"#nodes [data-node-id='{n['id']}']", modifiers=["Control"])
    row = page.page.locator(f"#iv-table tr[data-node-id='{n['id']}']")
    row.locator(".iv-op").select_option("set")
    row.locator(".iv-value").fill("2.5")
    page.page.select_option("#iv-mode", "constrained")
    page.page.click("#iv-run")
    page.page.wait_for_selector("#iv-top .iv-row", timeout=60_000)
    probs = [float(x) for x in page.page.locator("#iv-top .iv-after-prob").all_inner_texts()]
    ids = [
        int(x)
        for x in page.page.locator("#iv-top .iv-after-token").evaluate_all(
            "(es) => es.map((e) => e.dataset.id)"
        )
    ]
    logits = rm.intervene(
        graph.input_tokens, [Intervention(n["layer"], n["pos"], n["feature"], 2.5, "set")], mode="constrained"
    )[-1]
    v, i = logits.softmax(-1).topk(10)
    assert ids == i.tolist()
    assert probs == pytest.approx([round(x, 4) for x in v.tolist()], abs=1.1e-4)
    assert page.page.inner_text("#iv-cont") != "" or page.page.inner_text("#iv-base-cont") != ""
    page.shot("intervention")


def test_bad_input_shows_a_message_and_the_server_keeps_serving(browser, srv, folder):
    p = Page(browser, allowed_errors=("Failed to load resource",))  # the 4xx answers themselves
    open_graph(p, srv.url + "?slug=capitals")
    # an unknown feature in an intervention
    p.page.fill("#iv-add", "L0/999@1")
    p.page.click("#iv-run")
    p.page.wait_for_selector("#message:not([hidden])")
    assert "999" in p.page.inner_text("#message") and "48 features" in p.page.inner_text("#message")
    # a prompt longer than the context
    p.page.fill("#iv-add", "")
    p.page.fill("#prompt-input", "word " * 600)
    p.page.click("#attribute-btn")
    wait_js(p.page, "document.getElementById('message').textContent.includes('context')")
    # a graph of another CLT
    g = Graph.from_pt(folder / "capitals.pt")
    g.info["clt_checksum"] = "f" * 64
    g.to_pt(folder / "stranger.pt")
    open_graph(p, srv.url + "?slug=stranger")
    n = feature_nodes(srv)[0]
    p.page.click(f"#nodes [data-node-id='{n['id']}']", modifiers=["Control"])
    p.page.click("#iv-run")
    wait_js(p.page, "document.getElementById('message').textContent.includes('another CLT')")
    # a truncated graph file
    blob = (folder / "capitals.pt").read_bytes()
    (folder / "broken.pt").write_bytes(blob[: len(blob) // 3])
    p.page.goto(srv.url + "?slug=broken")
    p.page.wait_for_selector("#graph[data-ready='error']")
    assert "cannot be read" in p.page.inner_text("#message")
    p.shot("bad-graph")
    open_graph(p, srv.url + "?slug=capitals")  # still serving
    assert n_nodes(p) > 0
    for slug in ("stranger", "broken"):
        (folder / f"{slug}.pt").unlink()
    p.check()
    p.close()


def test_the_export_renders_from_file_with_the_same_nodes_and_cards(browser, folder, graph, tmp_path):
    out = tmp_path / "graph.html"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clt.cli",
            "view",
            str(folder / "capitals.pt"),
            "--export",
            str(out),
            "--node-threshold",
            "0.8",
            "--edge-threshold",
            "0.98",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    p = Page(browser, allow_file=True)
    requests: list[str] = []
    p.page.on("request", lambda r: requests.append(r.url))
    p.page.goto(out.as_uri())
    p.page.wait_for_selector("#graph[data-ready='1']", timeout=20_000)
    assert n_nodes(p) == int(prune(graph, 0.8, 0.98).node_mask.sum())
    assert all(u.startswith(("file://", "data:")) for u in requests), requests
    kept = json_nodes(graph, prune(graph, 0.8, 0.98))
    feat = next(n for n in kept.values() if n["feature_type"] == "cross layer transcoder")
    p.page.click(f"#nodes [data-node-id='{feat['node_id']}']")
    p.page.wait_for_selector("#card-body .example")
    assert p.page.locator(".logit-chip.top").count() > 0
    p.shot("export")
    p.check()
    p.close()


def test_paths_from_a_token_to_a_logit_and_pin_this_path(page, srv):
    open_graph(page, srv.url + "?slug=capitals")
    page.page.click("#paths-btn")
    page.page.wait_for_selector("#paths li.path")
    first = page.page.locator("#paths li.path").first
    nodes = first.get_attribute("data-nodes").split(",")
    assert nodes[0].startswith("E_") and nodes[-1] == page.page.input_value("#path-to")
    first.locator(".pin-path").click()
    assert page.page.evaluate("window.cltViewer.S.pinned") == nodes
    assert page.page.locator("#subgraph .sg-node").count() == len(nodes)


def test_a_graph_with_attention_shows_the_heads_behind_cross_position_inputs(
    browser, viewer_folder, tmp_path
):
    """`clt attribute --attention`: a node's card lists the heads carrying its cross-position inputs
    (their share of each edge, from the stored loadings) and why they attend (QK pairs)."""
    from clt.attribute import main as attribute_main
    from clt.viewer import serve
    from clt.viewer.graphs import LoadedGraph

    d = tmp_path / "graphs"
    args = [str(viewer_folder.clt), "The capital of France is Paris, and the capital of Italy is"]
    assert (
        attribute_main(
            [*args, "--out", str(d), "--slug", "att", "--batch-size", "16", "--no-plot", "--attention"]
        )
        == 0
    )
    g = Graph.from_pt(d / "att.pt")
    lg = LoadedGraph("att", g, 0)
    s = serve(str(d), quiet=True)
    p = Page(browser)
    try:
        open_graph(p, s.url)
        shown = set(
            p.page.locator("#nodes [data-node-id]").evaluate_all("(es) => es.map((e) => e.dataset.nodeId)")
        )
        targets = [int(t) for t in g.attention["edges"][:, 0].unique()]
        target = next(t for t in targets if lg.nodes[t]["id"] in shown and lg.attention(t)["qk"])
        want = lg.attention(target)
        p.page.click(f"#nodes [data-node-id='{lg.nodes[target]['id']}']")
        p.page.wait_for_selector("#card-attention", timeout=5000)
        text = p.page.text_content("#card-attention")  # the h3s are upper-cased by CSS
        best = want["inputs"][0]
        h = best["heads"][0]
        assert f"L{h['layer']}.H{h['head']} {100 * h['share']:.0f}%" in text
        rec = want["qk"][0]
        assert f"Why L{rec['layer']}.H{rec['head']} attends @{rec['query']} → @{rec['key']}" in text
        rows = p.page.locator("#card-attention table.qk").first.locator("tr")
        assert rows.count() == 1 + min(6, len(rec["pairs"]))
        assert rows.nth(1).locator("td").first.inner_text() == rec["pairs"][0][0]
        p.page.locator("#card-attention").scroll_into_view_if_needed()
        p.shot("card-attention")
        p.check()
    finally:
        p.close()
        s.shutdown()
