"""`clt serve DIR`: the viewer's HTTP server (standard library `ThreadingHTTPServer`: no new
dependency, works offline; one thread per connection, so a slow request never blocks another).

Binds 127.0.0.1 and a free port by default. Every file path is resolved and must stay inside its
root (the graph folder, the feature store, the package's static files): `..`, encoded `%2e%2e`,
absolute paths and symlinks out of the root get a 404. Files are served with an ETag (304 on
If-None-Match), gzip when the client accepts it (text types), and single HTTP byte ranges (206 with
the exact bytes, 416 outside the file).

Routes (circuit-tracer's frontend works on the same folder):
    GET  /                              the viewer (static/index.html)
    GET  /static/<file>                 its script and style
    GET  /data/<file>, /graph_data/<file>   files of the graph folder (graph-metadata.json, {slug}.json)
    GET  /features/<file>               the feature store (index.json.gz, layer_<l>.bin; Range)
    POST /save_graph/<slug>             circuit-tracer's Save ({"qParams": …}) -> our sidecar
    GET  /api/graphs                    the folder's graphs
    GET  /api/graph/<slug>?node_threshold=&edge_threshold=   the pruned view: nodes, scores
    GET  /api/edges/<slug>?…            the view's edges, binary (clt.viewer.graphs)
    GET  /api/neighbors/<slug>?node=&k= a node's strongest inputs and outputs
    GET  /api/card/<slug>?node=         a feature node's card and its activation on every prompt token
    GET  /api/search/<slug>?q=&…        features of the view whose card matches q (top logits, examples)
    GET  /api/paths/<slug>?from=&to=&k=&…   the k strongest paths in the view
    GET/POST /api/state/<slug>          the sidecar state ({slug}.state.json)
    POST /api/scores/<slug>             {"pinned": [...]} -> scores of the pinned subgraph
    POST /api/attribute                 {"prompt": …} -> a job; GET /api/job/<id> its progress
    POST /api/intervene                 {"slug", "mode", "interventions", "max_new_tokens"}
"""

from __future__ import annotations

import email.utils
import gzip
import json
import mimetypes
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from ..config import CLTError
from .cards import Cards
from .graphs import GraphFolder, NotFound, ViewerError, thresholds
from .state import empty_state, from_qparams, validate_state, write_state

STATIC = Path(str(resources.files("clt.viewer") / "static"))
TEXT_TYPES = ("text/", "application/json", "application/javascript", "image/svg+xml")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
MAX_BODY = 32 << 20


def contained(root: Path, rel: str) -> Path:
    """root/rel, resolved, if it stays inside root and is a file; else NotFound."""
    if not rel or "\x00" in rel or "\\" in rel or any(part in ("..", "") for part in rel.split("/")):
        raise NotFound("not found")
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()) or not p.is_file():
        raise NotFound("not found")
    return p


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """One `bytes=a-b` / `bytes=a-` / `bytes=-n` range -> (start, end inclusive); None for a
    header we do not honour (several ranges: the whole file is sent, as RFC 9110 allows).
    Raises ValueError when the range is unsatisfiable (-> 416)."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    a, _, b = spec.strip().partition("-")
    if not a and not b:
        return None
    if not a:  # the last n bytes
        n = int(b)
        if n <= 0 or size == 0:
            raise ValueError
        return max(0, size - n), size - 1
    start = int(a)
    end = int(b) if b else size - 1
    if start >= size or end < start:
        raise ValueError
    return start, min(end, size - 1)


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        folder: GraphFolder,
        session,
        features: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        quiet: bool = False,
    ):
        self.folder, self.session, self.quiet = folder, session, quiet
        self.cards = Cards(folder, features)
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/"

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Handler(BaseHTTPRequestHandler):
    server: ViewerServer
    protocol_version = "HTTP/1.1"
    server_version = "clt-viewer"

    def log_message(self, fmt: str, *args) -> None:  # one line per request, no headers or bodies
        self.server.log(f"{self.address_string()} {fmt % args}")

    # -- responses -------------------------------------------------------------------------------
    def _send(
        self, status: int, body: bytes, ctype: str, headers: dict | None = None, head: bool = False
    ) -> None:
        gz = (
            "gzip" in self.headers.get("Accept-Encoding", "")
            and ctype.startswith(TEXT_TYPES)
            and len(body) > 1024
        )
        if gz and status == 200:
            body = gzip.compress(body, 5)
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        if gz and status == 200:
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Vary", "Accept-Encoding")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def send_json(self, obj, status: int = 200, head: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", {"Cache-Control": "no-store"}, head)

    def send_error_json(self, status: int, message: str) -> None:
        self.send_json({"error": message}, status)

    def send_file(self, path: Path, head: bool = False, extra: dict | None = None) -> None:
        st = path.stat()
        etag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if path.suffix in (".js", ".mjs"):
            ctype = "application/javascript"
        if path.suffix == ".gz":  # served as stored (the reader gunzips it), never re-encoded
            ctype = "application/gzip"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        headers = {
            "ETag": etag,
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-cache",
            "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True),
            "Access-Control-Allow-Origin": "*",
        } | (extra or {})
        if etag in [t.strip() for t in self.headers.get("If-None-Match", "").split(",")]:
            self.send_response(304)
            for k in ("ETag", "Cache-Control"):
                self.send_header(k, headers[k])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        rng = self.headers.get("Range")
        if rng and self.headers.get("If-Range", etag) == etag:
            try:
                r = parse_range(rng, st.st_size)
            except ValueError:
                self._send(
                    416, b"", "application/octet-stream", headers | {"Content-Range": f"bytes */{st.st_size}"}
                )
                return
            if r is not None:
                a, b = r
                with open(path, "rb") as f:
                    f.seek(a)
                    body = f.read(b - a + 1)
                self.send_response(206)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Range", f"bytes {a}-{b}/{st.st_size}")
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)
                return
        body = path.read_bytes()
        self._send(200, body, ctype, headers, head)

    # -- routing ---------------------------------------------------------------------------------
    def do_HEAD(self) -> None:
        self._dispatch("GET", head=True)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str, head: bool = False) -> None:
        try:
            url = urlsplit(self.path)
            raw = url.path
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if method == "GET":
                self._get(raw, query, head)
            else:
                self._post(raw, query)
        except ViewerError as e:
            self.server.log(f"error {e.status}: {self.command} {self.path[:200]}: {e}")
            self.send_error_json(e.status, str(e))
        except CLTError as e:
            self.server.log(f"error 400: {self.command} {self.path[:200]}: {e}")
            self.send_error_json(400, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:  # noqa: BLE001 (report it, keep serving)
            self.server.log(f"error 500: {self.command} {self.path[:200]}:\n{traceback.format_exc()}")
            try:
                self.send_error_json(500, f"{type(e).__name__}: {e}")
            except OSError:
                pass

    def _rel(self, raw: str, prefix: str) -> str:
        return unquote(raw[len(prefix) :])

    def _get(self, raw: str, q: dict, head: bool) -> None:
        srv, folder = self.server, self.server.folder
        if raw in ("/", "/index.html"):
            self.send_file(STATIC / "index.html", head, {"Content-Security-Policy": CSP})
        elif raw.startswith("/static/"):
            self.send_file(contained(STATIC, self._rel(raw, "/static/")), head)
        elif raw.startswith(("/data/", "/graph_data/")):
            prefix = "/data/" if raw.startswith("/data/") else "/graph_data/"
            self.send_file(contained(folder.root, self._rel(raw, prefix)), head)
        elif raw.startswith("/features/"):
            store = srv.cards.store_dir()
            if store is None:
                raise NotFound(
                    "no feature store: the graphs' scan names none here (clt serve --features DIR)"
                )
            self.send_file(contained(store, self._rel(raw, "/features/")), head)
        elif raw == "/api/graphs":
            self.send_json({"graphs": folder.listing(), "clt": srv.session.checkpoint or ""}, head=head)
        elif raw.startswith("/api/"):
            parts = raw[len("/api/") :].split("/")
            if len(parts) != 2:
                raise NotFound(f"no API route {raw}")
            what, arg = parts[0], unquote(parts[1])
            if what == "job":
                self.send_json(srv.session.job(arg), head=head)
                return
            g = folder.get(arg)
            if what == "graph":
                self.send_json(g.view_json(g.view(*thresholds(q))), head=head)
            elif what == "edges":
                blob = g.view(*thresholds(q)).edges_blob()
                self._send(200, blob, "application/octet-stream", {"Cache-Control": "no-store"}, head)
            elif what == "neighbors":
                self.send_json(g.neighbours(q.get("node", ""), int(q.get("k", 10))), head=head)
            elif what == "card":
                self.send_json(self._card(g, q.get("node", "")), head=head)
            elif what == "search":
                self.send_json(self._search(g, q), head=head)
            elif what == "paths":
                v = g.view(*thresholds(q))
                self.send_json(
                    {"paths": g.paths(v, q.get("from", ""), q.get("to", ""), int(q.get("k", 5)))}, head=head
                )
            elif what == "state":
                path = folder.path(arg, ".state.json")
                if path.exists():
                    self.send_file(path, head, {"Cache-Control": "no-store"})
                else:
                    self.send_json(empty_state(arg), head=head)
            else:
                raise NotFound(f"no API route {raw}")
        else:
            raise NotFound(f"not found: {raw[:100]}")

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            raise ViewerError(f"request body of {n} bytes is larger than {MAX_BODY}")
        data = self.rfile.read(n) if n else b""
        try:
            return json.loads(data or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ViewerError(f"the request body is not JSON: {e}") from None

    def _post(self, raw: str, q: dict) -> None:
        srv, folder = self.server, self.server.folder
        body = self._body()
        if raw.startswith("/api/state/") or raw.startswith("/save_graph/"):
            slug = unquote(raw.rsplit("/", 1)[1])
            g = folder.get(slug)
            ids = g.id_to_index.keys()
            if raw.startswith("/save_graph/"):  # circuit-tracer's Save button: its qParams, into our sidecar

                def cantor_to_feature(c: int) -> str:
                    n = next((n for n in g.nodes if n["cantor"] == c), None)
                    if n is None:
                        raise ViewerError(f"bad viewer state: no feature with cantor id {c}")
                    return f"{n['layer']}/{n['feature']}"

                state = from_qparams((body or {}).get("qParams"), slug, ids, cantor_to_feature)
            else:
                state = validate_state(body, slug, ids)
            with folder.write_lock:
                write_state(folder.path(slug, ".state.json"), state)
            self.send_json({"ok": True, "state": state})
        elif raw.startswith("/api/scores/"):
            g = folder.get(unquote(raw.rsplit("/", 1)[1]))
            pinned = (body or {}).get("pinned", [])
            if not isinstance(pinned, list):
                raise ViewerError("pinned must be a list of node ids")
            self.send_json(g.subgraph_scores([str(x) for x in pinned]))
        elif raw == "/api/attribute":
            self.send_json(srv.session.start_attribution(body or {}), 202)
        elif raw == "/api/intervene":
            body = body or {}
            self.send_json(srv.session.intervene(folder.get(str(body.get("slug", ""))), body))
        else:
            raise NotFound(f"no POST route {raw}")

    # -- cards and search ------------------------------------------------------------------------
    def _card(self, g, node_id: str) -> dict:
        n = g.nodes[g.node_index(node_id)]
        if n["kind"] != "feature":
            raise ViewerError(f"{node_id} is a {n['kind']} node: only features have cards")
        return self.server.cards.node_card(g, n)

    def _search(self, g, q: dict) -> dict:
        """Features of the view whose card's top logits or example text contain q (case-insensitive)."""
        text = q.get("q", "").strip().lower()
        if not text:
            return {"matches": []}
        v = g.view(*thresholds(q))
        store = self.server.cards.store_dir(g.graph.scan)
        matches = []
        if store is not None:
            seen: dict[tuple[int, int], str | None] = {}
            for i in v.index.tolist():
                n = g.nodes[i]
                if n["kind"] != "feature":
                    continue
                key = (n["layer"], n["feature"])
                if key not in seen:
                    rec = self.server.cards.record(store, *key)
                    why = None
                    if rec is not None:
                        if any(
                            text == t.strip().lower() or text in t.lower() for t in rec.get("top_logits", [])
                        ):
                            why = "top logit"
                        else:
                            for grp in rec.get("examples_quantiles", []):
                                if any(text in "".join(ex["tokens"]).lower() for ex in grp["examples"]):
                                    why = "example text"
                                    break
                    seen[key] = why
                if seen[key]:
                    matches.append({"id": n["id"], "why": seen[key]})
        return {"matches": matches[:200]}


def serve(
    directory: str,
    port: int = 0,
    host: str = "127.0.0.1",
    clt: str | None = None,
    features: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    quiet: bool = False,
) -> ViewerServer:
    """A started server (in a daemon thread); `.url` is its address, `.shutdown()` stops it."""
    from .session import ModelSession

    folder = GraphFolder(directory)
    srv_ref: list[ViewerServer] = []
    session = ModelSession(folder, clt, device, dtype, log=lambda m: srv_ref[0].log(m) if srv_ref else None)
    try:
        srv = ViewerServer(folder, session, features, host, port, quiet)
    except OSError as e:
        raise ViewerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    srv_ref.append(srv)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv
