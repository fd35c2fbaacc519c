"""A local stand-in for the Hugging Face Hub: the HTTP endpoints `huggingface_hub` uses to create a
repo and a branch, commit files (preupload, the LFS batch API with basic PUT transfers, the NDJSON
commit) and download them (`resolve` HEAD/GET, repo info). Tests point HF_ENDPOINT at it (with
HF_HUB_DISABLE_XET=1: the Xet storage protocol is not implemented here; the Hub serves both).

Repos live in memory: branches -> commit -> {path: bytes}. Error responses carry the Hub's
X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound) that huggingface_hub maps to
its exceptions."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self):
        self.repos: dict[
            str, dict
        ] = {}  # repo id -> {"private", "branches": {name: sha}, "commits": {sha: files}}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.log: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo["commits"][repo["branches"].get(revision, revision)]


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        # -- responses -----------------------------------------------------------------------------
        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, code: int, obj, headers: dict | None = None):
            self._send(
                code, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}
            )

        def _error(self, code: int, error_code: str, message: str, head: bool = False):
            self._send(
                code,
                json.dumps({"error": message}).encode(),
                {"Content-Type": "application/json", "X-Error-Code": error_code, "X-Error-Message": message},
                head=head,
            )

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _repo(self, repo_id: str, head: bool = False) -> dict | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}", head)
            return repo

        def _commit(self, repo: dict, rev: str, head: bool = False) -> str | None:
            sha = repo["branches"].get(rev, rev if rev in repo["commits"] else None)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
            return sha

        # -- routes --------------------------------------------------------------------------------
        def do_HEAD(self):
            self._get(head=True)

        def do_GET(self):
            self._get(head=False)

        def _get(self, head: bool):
            path = unquote(urlparse(self.path).path)
            hub.log.append(("HEAD" if head else "GET", path))
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"]:  # repo info: /api/models/{repo}[/revision/{rev}]
                rest = parts[2:]
                rev = "main"
                if "revision" in rest:
                    i = rest.index("revision")
                    rest, rev = rest[:i], "/".join(rest[i + 1 :])
                repo = self._repo("/".join(rest), head)
                if repo is None:
                    return
                sha = self._commit(repo, rev, head)
                if sha is None:
                    return
                files = repo["commits"][sha]
                return self._json(
                    200,
                    {
                        "id": "/".join(rest),
                        "sha": sha,
                        "private": repo["private"],
                        "siblings": [{"rfilename": p} for p in sorted(files)],
                    },
                )
            if len(parts) >= 5 and parts[2] == "resolve":  # /{user}/{name}/resolve/{rev}/{path}
                repo = self._repo("/".join(parts[:2]), head)
                if repo is None:
                    return
                sha = self._commit(repo, parts[3], head)
                if sha is None:
                    return
                name = "/".join(parts[4:])
                content = repo["commits"][sha].get(name)
                if content is None:
                    return self._error(404, "EntryNotFound", f"{name} does not exist at {parts[3]}", head)
                etag = hashlib.sha256(content).hexdigest()
                return self._send(
                    200,
                    content,
                    {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"},
                    head=head,
                )
            self._error(404, "NotFound", f"no route {path}", head)

        def do_PUT(self):
            path = urlparse(self.path).path
            hub.log.append(("PUT", path))
            if path.startswith("/_lfs/"):
                oid, body = path.rsplit("/", 1)[1], self._body()
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._error(400, "BadRequest", "content does not match its oid")
                hub.lfs[oid] = body
                return self._send(200)
            self._error(404, "NotFound", f"no route {path}")

        def do_POST(self):
            path = unquote(urlparse(self.path).path)
            hub.log.append(("POST", path))
            body = self._body()
            parts = path.strip("/").split("/")
            if path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                if repo_id in hub.repos:
                    return self._json(
                        409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                    )
                empty = hashlib.sha1(repo_id.encode()).hexdigest()
                hub.repos[repo_id] = {
                    "private": bool(req.get("private")),
                    "branches": {"main": empty},
                    "commits": {empty: {}},
                }
                return self._json(200, {"url": f"{hub.url}/{repo_id}"})
            if path == "/api/validate-yaml":  # the model card's metadata: parsed as the Hub would
                import yaml

                content = json.loads(body)["content"]
                if content.startswith("---"):
                    try:
                        yaml.safe_load(content.split("---")[1])
                    except yaml.YAMLError as e:
                        return self._error(400, "BadRequest", f"invalid YAML metadata: {e}")
                return self._json(200, {"warnings": []})
            if path.endswith(".git/info/lfs/objects/batch"):
                req = json.loads(body)
                objects = []
                for o in req["objects"]:
                    entry = {"oid": o["oid"], "size": o["size"]}
                    if o["oid"] not in hub.lfs:
                        entry["actions"] = {"upload": {"href": f"{hub.url}/_lfs/{o['oid']}"}}
                    objects.append(entry)
                return self._json(200, {"transfer": "basic", "objects": objects})
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo_id, action, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(
                        200,
                        {
                            "files": [
                                {
                                    "path": f["path"],
                                    "shouldIgnore": False,
                                    "oid": None,
                                    "uploadMode": "lfs"
                                    if f["path"].endswith((".safetensors", ".png"))
                                    else "regular",
                                }
                                for f in files
                            ]
                        },
                    )
                if action == "branch":
                    if rev in repo["branches"]:
                        return self._json(409, {"error": "Reference already exists"})
                    repo["branches"][rev] = repo["branches"]["main"]
                    return self._json(200, {})
                if action == "commit":
                    return self._apply_commit(repo_id, repo, rev, body)
            self._error(404, "NotFound", f"no route {path}")

        def _apply_commit(self, repo_id: str, repo: dict, rev: str, body: bytes):
            parent = self._commit(repo, rev)
            if parent is None:
                return
            files = dict(repo["commits"][parent])
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(400, "BadRequest", f"LFS object {value['oid']} was not uploaded")
                    files[value["path"]] = hub.lfs[value["oid"]]
                elif key in ("deletedFile", "deletedFolder"):
                    files = {
                        p: c
                        for p, c in files.items()
                        if p != value["path"] and not p.startswith(value["path"].rstrip("/") + "/")
                    }
            digest = hashlib.sha1(parent.encode())
            for p in sorted(files):
                digest.update(p.encode() + hashlib.sha256(files[p]).digest())
            sha = digest.hexdigest()
            repo["commits"][sha] = files
            repo["branches"][rev] = sha
            return self._json(
                200,
                {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None},
            )

    return Handler


def hub_env(hub: FakeHub, tmp_path, **extra) -> dict:
    """The environment that points huggingface_hub at `hub` (token, no Xet, a private HF_HOME)."""
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_TOKEN": "hf_test",
        "HF_HOME": str(tmp_path / "hf"),
        **extra,
    }
