"""Every command the docs/ pages show is exercised: those that can run here run with tiny settings
(the tiny Llama and a random CLT instead of the demo's, a few steps, a local Hub stand-in); those
that need the network, GPUs or a multi-node cluster are composed and validated exactly as they
would start (Hydra config, sbatch template syntax, `submit.py --dry-run`). A command the docs gain
without a case here fails the test. (README commands: tests/test_readme.py.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cache_cli, circuits_cli, compose, served_graphs, tiny_overrides, train_cli
from hub_server import FakeHub, hub_env

# Commands that cannot run on this machine (a model or data set downloaded at run time, GPUs,
# W&B, a Slurm launcher) or that another test runs (trainer=ddp: tests/test_distributed.py, two
# processes): they are composed and validated here.
NOT_RUN_HERE = re.compile(
    r"HuggingFaceTB/|meta-llama/|name_or_path=gpt2|bert-base-uncased|data=(fineweb|fineweb_edu|openwebtext)|allenai/c4|"
    r"experiment=|logger=wandb|trainer=gpu|trainer=ddp|hydra/launcher=slurm"
)


def docs_commands() -> list[tuple[str, str]]:
    """(page, command) for every line of every ```bash block of docs/*.md (continuations joined)."""
    out = []
    for page in sorted((REPO / "docs").glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                if line and not line.startswith("#"):
                    out.append((page.name, line))
    return out


def run(argv: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        argv, cwd=REPO, env=os.environ | (env or {}), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{argv}\n{done.stderr[-3000:]}"
    return done


class Pool:
    """Commands that need nothing from each other run two at a time (most of a tiny command's time is
    Python importing torch, on one core): `start` launches (waiting while two run), `wait` ends them
    all and runs each one's checks."""

    def __init__(self, folder: Path, width: int = 2):
        self.folder, self.width, self.running, self.n = folder, width, [], 0
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, argv: list[str], check=None, env: dict | None = None) -> None:
        while len(self.running) >= self.width:
            self._end(self.running.pop(0))
        self.n += 1
        log = open(self.folder / f"{self.n}.log", "w+")
        env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        self.running.append((argv, proc, log, check))

    def _end(self, job) -> None:
        argv, proc, log, check = job
        rc = proc.wait(timeout=600)
        log.seek(0)
        output = log.read()
        log.close()
        assert rc == 0, f"{argv}\n{output[-3000:]}"
        if check:
            check(output)

    def wait(self) -> None:
        while self.running:
            self._end(self.running.pop(0))


def overrides_of(argv: list[str]) -> list[str]:
    """The Hydra overrides of a command line, placeholders (…) dropped, a sweep's first value."""
    out = []
    for a in argv:
        if a in ("…", "-m") or "=" not in a:
            continue
        k, v = a.split("=", 1)
        out.append(f"{k}={v.split(',')[0]}" if k.startswith(("clt.", "trainer.")) else a)
    return out


def check_train_config(overrides: list[str]) -> None:
    """The config `python train.py OVERRIDES` would run composes and validates (hydra/* groups are
    Hydra's own: checked to exist)."""
    ours = []
    for o in overrides:
        if o.startswith("hydra/"):
            group, name = o.split("=", 1)
            assert (REPO / "conf" / group / f"{name}.yaml").exists(), o
        else:
            ours.append(o)
    compose(ours)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory, tiny_model_dir):
    """`python -m clt.cache …` with tiny settings (the cache the cached-data commands read)."""
    root = tmp_path_factory.mktemp("docs-cache") / "sotu"
    run(cache_cli(tiny_model_dir, root, 3000))
    return root


def test_every_docs_command_runs_or_is_checked(viewer_folder, tiny_model_dir, tiny_cache, tmp_path):
    commands = docs_commands()
    assert len(commands) >= 30
    import shutil

    clt_dir, graphs = str(tmp_path / "clt"), viewer_folder.folder
    shutil.copytree(viewer_folder.clt, clt_dir)  # (commands add cards to the store next to it)
    stores: list[Path] = []
    ran = checked = 0
    pool = Pool(tmp_path / "logs")
    for page, cmd in commands:
        argv = shlex.split(cmd)
        head = argv[:3]
        if argv[:2] == ["python", "train.py"] and argv[2:] == ["--help"]:
            pool.start([sys.executable, "train.py", "--help"], lambda out: "clt" in out or pytest.fail(out))
            ran += 1
        elif argv[:2] == ["python", "train.py"]:
            over = overrides_of(argv[2:])
            check_train_config(over)
            checked += 1
            if NOT_RUN_HERE.search(cmd) or "hub.repo_id" in cmd:  # (hub push: tests/test_hub.py)
                continue
            tiny = dict(o.split("=", 1) for o in tiny_overrides(tiny_model_dir, tmp_path / f"run{ran}"))
            mine = dict(o.split("=", 1) for o in over)
            mine.pop("model.name_or_path", None)
            if "data.dataset" in mine and mine["data.dataset"].startswith("/path/"):
                texts = tmp_path / "texts"
                texts.mkdir(exist_ok=True)
                docs = [{"body": f"Document {i}: " + "the quick brown fox jumps. " * 40} for i in range(8)]
                (texts / "a.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
                mine["data.dataset"] = str(texts)
            if mine.get("data.cache") == "cache/sotu":
                mine["data.cache"] = str(tiny_cache)
            for k in ("clt.d_sae", "data.buffer_tokens", "trainer.batch_tokens"):
                mine.pop(k, None)  # tiny sizes
            mine["trainer.max_steps"] = "2"
            pool.start([sys.executable, "train.py", *[f"{k}={v}" for k, v in (tiny | mine).items()]])
            ran += 1
        elif head[:3] == ["python", "-m", "clt.cache"] and argv[3:4] == ["verify"]:
            pool.start(
                [sys.executable, "-m", "clt.cache", "verify", str(tiny_cache)],
                lambda out: "every checksum ok" in out or pytest.fail(out),
            )
            ran += 1
        elif head == ["python", "-m", "clt.cache"]:
            from clt.config import CacheJobConfig

            compose(overrides_of(argv[3:]), "cache", CacheJobConfig)
            checked += 1  # and run with tiny settings by the tiny_cache fixture
        elif argv[0] == "sbatch":
            script = next(a for a in argv if a.endswith(".sbatch"))
            run(["bash", "-n", script])
            over = overrides_of(argv[argv.index(script) + 1 :])
            if "cache.sbatch" not in script:
                check_train_config([o for o in over if not o.startswith(("cache.", "features."))])
            checked += 1
        elif argv[:2] == ["python", "slurm/submit.py"]:
            pool.start(
                [sys.executable, "slurm/submit.py", "--dry-run", *argv[2:]],
                lambda out: "sbatch" in out or pytest.fail(out),
            )
            checked += 1
        elif head == ["python", "-m", "clt.features"] and argv[3] == "render":
            out = tmp_path / "card.png"
            pool.wait()  # (the store it renders from)
            run([sys.executable, "-m", "clt.features", "render", str(stores[0]), "1", "5", "--out", str(out)])
            assert out.stat().st_size > 10_000
            ran += 1
        elif head == ["python", "-m", "clt.features"] or argv[:2] == ["clt", "features"]:
            over = [
                o for o in overrides_of(argv[3:] if argv[0] == "python" else argv[2:]) if "tokens" not in o
            ]
            over = [f"data.cache={tiny_cache}" if o == "data.cache=cache/sotu" else o for o in over]
            if not any(o.startswith("data.cache") for o in over):
                over += ["data.context_size=32", "data.batch_windows=4"]
            store = tmp_path / f"store{len(stores)}"
            stores.append(store)
            pool.start(
                [
                    sys.executable,
                    "-m",
                    "clt.features",
                    clt_dir,
                    *over,
                    "features.tokens=600",
                    f"features.out={store}",
                ],
                lambda out, store=store: (store / "manifest.json").exists() or pytest.fail(out),
            )
            ran += 1
        elif head == ["python", "-m", "clt.attribute"]:
            out = tmp_path / f"paris{ran}"
            extra = ["--cards", "--cards-tokens", "600"] if "--cards" in argv else []
            extra += ["--attention"] if "--attention" in argv else []
            pool.start(
                [
                    sys.executable,
                    "-m",
                    "clt.attribute",
                    clt_dir,
                    argv[4],
                    "--out",
                    str(out),
                    "--batch-size",
                    "16",
                    "--no-plot",
                    *extra,
                ],
                lambda log, out=out: (out / "graph.pt").exists() or pytest.fail(log),
            )
            ran += 1
        elif head[:2] == ["python", "-m"] and argv[2] == "clt.push":
            with FakeHub() as hub:
                run([sys.executable, "-m", "clt.push", clt_dir, *argv[4:]], env=hub_env(hub, tmp_path))
                files = hub.files(argv[4], argv[argv.index("--revision") + 1])
                assert files["model.safetensors"] == (Path(clt_dir) / "model.safetensors").read_bytes()
            ran += 1
        elif argv[:2] == ["clt", "serve"]:
            assert b"capitals" in served_graphs(graphs)
            ran += 1
        elif argv[:2] in (["clt", "heads"], ["clt", "pinpoint"]):  # on the tiny model, tiny settings
            assert argv[2] == "bundled:smollm2-135m-instruct", cmd
            out = tmp_path / f"{argv[1]}{ran}"
            pool.start(
                circuits_cli(argv, tiny_model_dir, out),
                lambda log, out=out: any(out.iterdir()) or pytest.fail(log),
            )
            ran += 1
        elif argv[:2] == ["python", "toy.py"]:
            over = [a for a in argv[2:] if "=" in a]
            from omegaconf import OmegaConf

            from clt.config import ToyJobConfig, load_config

            if "data=openwebtext" in cmd:  # needs network: the config is checked, not run
                load_config(OmegaConf.create({"toy": {}}), ToyJobConfig)
                checked += 1
                continue
            tiny = [
                "toy.d_model=32",
                "toy.steps=2",
                "toy.eval_every=0",
                "toy.repeat_n=10",
                "data.context_size=32",
                "data.batch_windows=2",
                f"toy.out={tmp_path / f'toy{ran}'}",
            ]
            made = tmp_path / f"toy{ran}" / "model" / "config.json"
            pool.start(
                [sys.executable, "toy.py", *over, *tiny],
                lambda log, made=made: made.exists() or pytest.fail(log),
            )
            ran += 1
        elif head == ["python", "-m", "clt.convert"]:  # a tiny TopK run, converted with the options shown
            run_dir = tmp_path / "convert-src"
            if not run_dir.exists():
                done = train_cli(
                    tiny_overrides(tiny_model_dir, run_dir, **{"data.eval_docs": 4, "trainer.max_steps": 4})
                )
                assert done.returncode == 0, done.stderr[-3000:]
            opts = [a for a in argv[4:] if a != "--out" and not a.startswith("runs/")]
            out = tmp_path / f"converted{ran}"
            steps = ["--finetune-steps", "2"] if "--finetune-steps" in opts else []
            pool.start(
                [
                    sys.executable,
                    "-m",
                    "clt.convert",
                    str(run_dir),
                    *opts,
                    *steps,
                    "--calibration-windows",
                    "16",
                    "--out",
                    str(out),
                ],
                lambda log, out=out: (
                    ((out / "clt" / "model.safetensors").exists() and (out / "report.json").exists())
                    or pytest.fail(log)
                ),
            )
            ran += 1
        elif argv[:2] == ["python", "benchmarks/topk_scope.py"]:  # two trainings: their configs checked
            over = overrides_of(argv[2:])
            for scope in ("layer", "all"):
                check_train_config([*over, f"clt.topk_scope={scope}"])
            pool.start(
                [sys.executable, "benchmarks/topk_scope.py", "--help"],
                lambda out: "topk_scope" in out or pytest.fail(out),
            )
            checked += 1
        elif argv[:2] == ["clt", "view"]:
            out = tmp_path / "paris.html"
            pool.start(
                [sys.executable, "-m", "clt.cli", "view", str(graphs / "capitals.pt"), "--export", str(out)],
                lambda log, out=out: "<html" in out.read_text()[:500].lower() or pytest.fail(log),
            )
            ran += 1
        else:
            raise AssertionError(f"docs/{page} shows a command this test neither runs nor checks: {cmd}")
    pool.wait()
    assert ran >= 12 and checked >= 15, (ran, checked)
