"""Long runs meet faults (issue: NaNs, flaky streams, full disks, torn checkpoints, two writers,
signals, missing things). Each test injects the fault and asserts what the trainer does exactly."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose, tiny_overrides, train_cli

import clt.loss as clt_loss_module
from clt.data import stream
from clt.errors import DataError, TrainingError
from clt.model import CrossLayerTranscoder
from clt.training import run

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _one_line_error(out, *needles):
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "override,needles",
    [
        (
            {"model.name_or_path": "/no/such/model"},
            ["model.name_or_path='/no/such/model'", "no such directory"],
        ),
        (
            {"model.name_or_path": "someorg/not-cached"},
            ["model.name_or_path='someorg/not-cached'", "not in the Hugging Face cache", "HF_HUB_OFFLINE=1"],
        ),
        (
            {"data.dataset": "someorg/no-dataset"},
            ["data.dataset='someorg/no-dataset'", "HF_HUB_OFFLINE=1", "--repo-type dataset"],
        ),
        (
            {"data.dataset": "./no/such/corpus"},
            ["data.dataset='./no/such/corpus'", "no such file or directory"],
        ),
    ],
    ids=["local-model", "hub-model", "hub-dataset", "local-dataset"],
)
def test_missing_things_are_one_line_user_errors(tiny_model_dir, tmp_path, override, needles):
    env = OFFLINE | {"HF_HOME": str(tmp_path / "empty-cache")}
    out = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "run", **override), env=env)
    _one_line_error(out, *needles)
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.parametrize("model", ["/no/such/model", "someorg/not-cached"])
def test_attribute_with_a_missing_model_is_a_user_error(viewer_folder, tmp_path, model):
    clt_dir = viewer_folder.clt
    env = OFFLINE | {"HF_HOME": str(tmp_path / "empty-cache")}
    cmd = [sys.executable, "-m", "clt.attribute", str(clt_dir), "hello", "--model", model]
    cmd += ["--out", str(tmp_path / "graphs")]
    out = subprocess.run(cmd, cwd=REPO, env=os.environ | env, capture_output=True, text=True, timeout=300)
    _one_line_error(out, f"--model={model!r}")
    assert not (tmp_path / "graphs").exists()


# -- the non-finite guard ---------------------------------------------------------------------------

QUIET = {"trainer.eval_every": 0, "trainer.ckpt_every": 100, "trainer.max_steps": 12}


class _NaNGrad(torch.autograd.Function):
    """0 forward, NaN backward: a finite loss whose gradient is not finite."""

    @staticmethod
    def forward(ctx, w):
        ctx.shape = w.shape
        return w.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, float("nan"))


def _faulty_loss(monkeypatch, at: set[int], kind: str = "loss"):
    """clt_loss with a fault on the calls (training steps) numbered in `at` (0-based)."""
    real, calls = clt_loss_module.clt_loss, {"n": 0}

    def faulty(clt, *a, **k):
        t = real(clt, *a, **k)
        n, calls["n"] = calls["n"], calls["n"] + 1
        if n not in at:
            return t
        if kind == "loss":
            return t._replace(total=t.total * float("nan"))
        return t._replace(total=t.total + _NaNGrad.apply(clt.W_enc))

    monkeypatch.setattr(clt_loss_module, "clt_loss", faulty)


def _without_batches(monkeypatch, drop: set[int]):
    """The training stream with the batches numbered in `drop` left out."""
    real = stream.ActivationSource.batches

    def batches(self, start=None, tokens=False):
        for i, b in enumerate(real(self, start, tokens)):
            if i not in drop:
                yield b

    monkeypatch.setattr(stream.ActivationSource, "batches", batches)


def _weights(run_dir):
    return dict(CrossLayerTranscoder.from_pretrained(run_dir / "clt").state_dict())


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_a_non_finite_step_is_skipped_exactly(tiny_model_dir, tmp_path, monkeypatch, kind):
    """A NaN loss (or a finite loss with a NaN gradient) at batch 7: that step is skipped, and the
    final weights equal those of a run trained on the same batches without batch 7."""
    with monkeypatch.context() as mp:
        _faulty_loss(mp, {7}, kind)
        run(compose(tiny_overrides(tiny_model_dir, tmp_path / "faulty", **QUIET)))
    with monkeypatch.context() as mp:
        _without_batches(mp, {7})
        run(compose(tiny_overrides(tiny_model_dir, tmp_path / "clean", **QUIET)))
    a, b = _weights(tmp_path / "faulty"), _weights(tmp_path / "clean")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    health = [json.loads(line) for line in (tmp_path / "faulty" / "health.jsonl").read_text().splitlines()]
    assert len(health) == 1 and health[0]["step"] == 8
    assert health[0]["reason"] == ("non-finite loss" if kind == "loss" else "non-finite gradient norm")
    assert len(health[0]["tokens"]) == 128  # the batch's token ids (trainer.batch_tokens)
    state = torch.load(tmp_path / "faulty" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 12 and state["clt_skipped_steps"] == 1
    assert not (tmp_path / "clean" / "health.jsonl").exists()


def test_too_many_bad_steps_in_a_row_stop_naming_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    extra = QUIET | {"trainer.ckpt_every": 2, "trainer.max_bad_steps": 3}
    _faulty_loss(monkeypatch, set(range(5, 100)))  # every batch from the 6th on
    with pytest.raises(TrainingError) as e:
        run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **extra)))
    msg = str(e.value)
    assert "3 steps in a row" in msg and "the last at step 6" in msg
    assert f"{tmp_path / 'run' / 'checkpoints' / 'step-0000004.ckpt'} (step 4)" in msg
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4  # (step 5 was taken but not checkpointed: cadence 2)
    assert len((tmp_path / "run" / "health.jsonl").read_text().splitlines()) == 3


def test_a_non_finite_weight_is_never_checkpointed(tiny_model_dir, tmp_path, monkeypatch):
    from clt.training.module import CLTModule

    real = CLTModule.optimizer_step

    def poisoned(self, *a, **k):
        real(self, *a, **k)
        if self.trainer.global_step == 7:  # step 8's update overflowed (the count moves after the hook)
            with torch.no_grad():
                self.clt.W_enc[0, 0, 0] = float("inf")

    monkeypatch.setattr(CLTModule, "optimizer_step", poisoned)
    extra = QUIET | {"trainer.ckpt_every": 4}
    with pytest.raises(TrainingError, match=r"step 8: non-finite weights \(W_enc\); not checkpointed"):
        run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **extra)))
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "run").values())


# -- signals -----------------------------------------------------------------------------------------
def _start(tiny_model_dir, run_dir, **extra):
    """train.py in the background; its stdout and stderr go to files beside run_dir (`_output`)."""
    args = [sys.executable, str(REPO / "train.py"), *tiny_overrides(tiny_model_dir, run_dir, **extra)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    out, err = (open(run_dir.parent / f"{run_dir.name}.{s}", "w") for s in ("out", "err"))
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err)


def _output(run_dir) -> tuple[str, str]:
    out, err = ((run_dir.parent / f"{run_dir.name}.{s}").read_text() for s in ("out", "err"))
    return out, err


def _wait_for_training(proc, run_dir, timeout=300):
    import time

    metrics = run_dir / "logs" / "version_0" / "metrics.csv"
    deadline = time.time() + timeout
    while not metrics.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, _output(run_dir)[1][-3000:]


@pytest.mark.parametrize("sig", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_a_signal_checkpoints_at_the_step_end_and_resume_is_exact(tiny_model_dir, tmp_path, sig):
    import signal

    extra = {"trainer.max_steps": 150, "trainer.ckpt_every": 1000, "trainer.eval_every": 0}
    run(compose(tiny_overrides(tiny_model_dir, tmp_path / "ref", **extra)))
    proc = _start(tiny_model_dir, tmp_path / "run", **extra)
    _wait_for_training(proc, tmp_path / "run")
    proc.send_signal(getattr(signal, sig))
    proc.wait(timeout=300)
    out, err = _output(tmp_path / "run")
    assert proc.returncode == 128 + getattr(signal, sig), err[-3000:]
    assert "Traceback" not in err
    step = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < step < 150
    assert f"{sig}: checkpoint at step {step}" in out
    run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **extra)))  # resumed
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_second_sigint_exits_at_once(tiny_model_dir, tmp_path):
    import signal
    import time

    extra = {"trainer.max_steps": 400, "trainer.ckpt_every": 1000, "trainer.eval_every": 0}
    proc = _start(tiny_model_dir, tmp_path / "run", **extra)
    _wait_for_training(proc, tmp_path / "run")
    proc.send_signal(signal.SIGINT)
    deadline = time.time() + 30
    while "stopping after this step" not in _output(tmp_path / "run")[1] and time.time() < deadline:
        time.sleep(0.01)  # (two signals before the handler runs count as one)
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    proc.wait(timeout=60)
    _, err = _output(tmp_path / "run")
    assert proc.returncode == 130 and time.time() - t0 < 10
    assert "second SIGINT: exiting now" in err


# -- one trainer per run directory ---------------------------------------------------------------------
def _foreign_lock(run_dir, pid, host=None, slurm_job=None, age=0.0):
    import socket
    import time

    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {
        "host": host or socket.gethostname(),
        "pid": pid,
        "slurm_job": slurm_job,
        "started": time.time(),
    }
    (run_dir / ".lock").write_text(json.dumps(holder))
    if age:
        os.utime(run_dir / ".lock", (time.time() - age, time.time() - age))


def test_the_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, monkeypatch, capsys):
    from clt.config import ConfigError
    from clt.training.lock import STALE_AFTER, RunLock

    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        _foreign_lock(tmp_path / "a", live.pid)
        with pytest.raises(
            ConfigError, match=rf"pid {live.pid} on .*is being trained by another|pid {live.pid}"
        ):
            RunLock(tmp_path / "a").acquire()
        _foreign_lock(tmp_path / "b", 12345, host="another-node")  # fresh, on a host we cannot ask
        with pytest.raises(ConfigError, match="another-node"):
            RunLock(tmp_path / "b").acquire()
        for name, kw in {
            "c": {"pid": dead.pid},  # same host, the process is gone
            "d": {"pid": 12345, "host": "another-node", "age": STALE_AFTER + 60},  # not refreshed
            "e": {"pid": live.pid, "slurm_job": "4242"},  # this job's earlier run (requeued)
        }.items():
            _foreign_lock(tmp_path / name, **kw)
            monkeypatch.setenv("SLURM_JOB_ID", "4242")
            with RunLock(tmp_path / name) as lock:
                held = json.loads((tmp_path / name / ".lock").read_text())
                assert held["pid"] == os.getpid() and lock._ours()
            assert "taking over the lock" in capsys.readouterr().err
            assert not (tmp_path / name / ".lock").exists()  # released
    finally:
        live.kill()


def test_a_second_trainer_on_a_run_dir_exits_2_naming_the_holder(tiny_model_dir, tmp_path):
    import signal

    extra = {"trainer.max_steps": 2000, "trainer.ckpt_every": 10000, "trainer.eval_every": 0}
    first = _start(tiny_model_dir, tmp_path / "run", **extra)
    try:
        _wait_for_training(first, tmp_path / "run")
        second = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "run", **extra))
        _one_line_error(second, "is being trained by another process", f"pid {first.pid} on ")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM  # the first run was not disturbed
    assert not (tmp_path / "run" / ".lock").exists()


# -- checkpoints you can trust ------------------------------------------------------------------------
def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        with open(path, "r+b") as f:
            f.truncate(len(data) // 2)
    else:  # one bit flipped in the middle
        with open(path, "r+b") as f:
            f.seek(len(data) // 2)
            f.write(bytes([data[len(data) // 2] ^ 0x10]))


def _verify(run_dir) -> int:
    from clt.cli import main

    return main(["verify", str(run_dir)])


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_a_damaged_last_checkpoint_resumes_from_the_previous_one(tiny_model_dir, tmp_path, how, capsys):
    ck = {"trainer.ckpt_every": 4, "trainer.eval_every": 0}
    run(compose(tiny_overrides(tiny_model_dir, tmp_path / "ref", **ck, **{"trainer.max_steps": 16})))
    run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **ck, **{"trainer.max_steps": 12})))
    d = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in d.glob("step-*")) == [
        "step-0000008.ckpt",
        "step-0000008.sha256",
        "step-0000012.ckpt",
        "step-0000012.sha256",
    ]  # the newest trainer.keep_checkpoints = 2
    assert os.path.samefile(d / "last.ckpt", d / "step-0000012.ckpt")
    _damage(d / "last.ckpt", how)  # (last.ckpt is the newest checkpoint's file)
    capsys.readouterr()
    assert _verify(tmp_path / "run") == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and "a resume would start from step 8" in out
    run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **ck, **{"trainer.max_steps": 16})))
    err = capsys.readouterr().err
    assert "cannot be trusted" in err and "resuming from step 8 instead" in err
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k  # from step 8 to 16: the uninterrupted run's weights
    assert (d / "step-0000012.ckpt.damaged").exists()  # set aside, not deleted
    assert _verify(tmp_path / "run") == 0


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tiny_model_dir, tmp_path, capsys):
    ck = {"trainer.ckpt_every": 4, "trainer.eval_every": 0, "trainer.max_steps": 8}
    run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **ck)))
    for p in (tmp_path / "run" / "checkpoints").glob("step-*.ckpt"):
        _damage(p, "truncated")
    from clt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no intact checkpoint .*nothing to resume from"):
        run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **(ck | {"trainer.max_steps": 12}))))
    assert _verify(tmp_path / "run") == 2


def test_a_damaged_native_clt_falls_back_to_the_previous_save(tmp_path, capsys):
    from clt.io import load_clt, verify_native
    from clt.model import CLTArchitecture

    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    old = CrossLayerTranscoder(CLTArchitecture(n_layers=2, d_model=8, d_sae=16, activation="topk", k=2))
    old.save_pretrained(run_dir / "clt.previous")
    new = CrossLayerTranscoder(CLTArchitecture(n_layers=2, d_model=8, d_sae=16, activation="topk", k=2))
    new.save_pretrained(run_dir / "clt")
    assert verify_native(run_dir / "clt") is None
    torch.testing.assert_close(load_clt(run_dir).W_enc, new.W_enc)
    _damage(run_dir / "clt" / "model.safetensors", "truncated")
    assert "truncated" in verify_native(run_dir / "clt")
    torch.testing.assert_close(load_clt(run_dir).W_enc, old.W_enc)
    assert "loading the previous save" in capsys.readouterr().err
    _damage(run_dir / "clt.previous" / "model.safetensors", "bit-flipped")
    assert "sha256" in verify_native(run_dir / "clt.previous")


# -- a full disk --------------------------------------------------------------------------------------
def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_resume_is_exact(
    tiny_model_dir, tmp_path, monkeypatch
):
    import errno

    import lightning

    ck = {"trainer.ckpt_every": 4, "trainer.eval_every": 0, "trainer.max_steps": 12}
    run(compose(tiny_overrides(tiny_model_dir, tmp_path / "ref", **ck)))
    real = lightning.Trainer.save_checkpoint

    def full(self, filepath, *a, **k):
        if "step-0000008" in str(filepath):
            open(filepath, "wb").write(b"partial")  # the disk fills up mid-write
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, filepath, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(lightning.Trainer, "save_checkpoint", full)
        with pytest.raises(TrainingError) as e:
            run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **ck)))
    msg = str(e.value)
    assert "step 8: writing the checkpoint to" in msg and "the disk is full" in msg
    assert "MiB are free" in msg and "resume from step 4" in msg
    d = tmp_path / "run" / "checkpoints"
    assert not list(d.glob("step-0000008*"))  # the partial file is gone
    state = torch.load(d / "last.ckpt", weights_only=False)
    assert state["global_step"] == 4  # the previous checkpoint loads
    run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **ck)))  # space freed: resume
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- a flaky text stream ------------------------------------------------------------------------------
class FlakyServer:
    """A loopback HTTP server for one JSONL corpus whose GETs fail as planned: `plan[n]` for the
    n-th GET (0-based) is ("reset", byte offset) — the connection dropped mid-body —, ("stall",
    seconds) before answering, or ("503",); `fail_from`: every GET from this one on answers 503."""

    def __init__(self, corpus: bytes):
        import http.server
        import threading

        self.corpus, self.plan, self.fail_from, self.gets = corpus, {}, None, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _headers(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(server.corpus)))
                self.end_headers()

            def do_HEAD(self):
                self._headers()

            def do_GET(self):
                import time

                n, server.gets = server.gets, server.gets + 1
                fault = server.plan.get(n) or (
                    ("503",) if server.fail_from is not None and n >= server.fail_from else None
                )
                if fault and fault[0] == "503":
                    self.send_error(503, "Service Unavailable")
                    return
                if fault and fault[0] == "stall":
                    time.sleep(fault[1])
                self._headers()
                try:
                    if fault and fault[0] == "reset":
                        self.wfile.write(server.corpus[: fault[1]])
                        self.wfile.flush()
                        self.connection.shutdown(2)  # the connection drops mid-body
                        return
                    self.wfile.write(server.corpus)
                except OSError:  # the client gave up on this answer (a stall past its timeout)
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/corpus.jsonl"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


@pytest.fixture(scope="module")
def corpus():
    from clt.config import DataConfig
    from clt.data.text import iter_documents, load_text_dataset

    ds, col = load_text_dataset(DataConfig(dataset="sotu"))
    docs = [t for _, t in zip(range(60), iter_documents(ds, col))]
    return "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()


@pytest.fixture(scope="module")
def small_corpus(corpus):
    """12 short documents: a run wraps around it (and reads it again) every few steps."""
    docs = [json.loads(line)["text"][:300] for line in corpus.decode().splitlines()[:12]]
    return "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()


STREAM = {
    "data.stream_backoff": 0.01,
    "data.stream_timeout": 2,
    "trainer.eval_every": 0,
    "trainer.max_steps": 12,
}


def _unfaulted_run(tiny_model_dir, run_dir, corpus: bytes) -> int:
    """A run reading `corpus` from a server without faults -> the GETs it made."""
    clean = FlakyServer(corpus)
    try:
        run(compose(tiny_overrides(tiny_model_dir, run_dir, **STREAM, **{"data.dataset": clean.url})))
        return clean.gets
    finally:
        clean.close()


def test_a_flaky_stream_gives_exactly_the_batches_of_an_unfaulted_run(tiny_model_dir, tmp_path, corpus):
    """Runs of resets mid-body (fsspec reads again itself), 503 answers and stalls past the read
    timeout (these reach our retries) at points spread over the run: the same weights."""
    n = _unfaulted_run(tiny_model_dir, tmp_path / "clean", corpus)
    flaky = FlakyServer(corpus)
    assert n >= 4  # (the corpus is read several times: held-out windows, normalisation, training)
    # pairs of faults, two good reads apart (so a retry can get through)
    flaky.plan = {3: ("reset", len(corpus) // 3), 4: ("reset", 100), 7: ("503",), 8: ("503",)}
    flaky.plan |= {11: ("stall", 3), 12: ("stall", 3)}
    try:
        run(
            compose(
                tiny_overrides(tiny_model_dir, tmp_path / "flaky", **STREAM, **{"data.dataset": flaky.url})
            )
        )
    finally:
        flaky.close()
    assert flaky.gets > max(flaky.plan) and flaky.gets > n  # every fault was served, and read again
    a, b = _weights(tmp_path / "clean"), _weights(tmp_path / "flaky")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_our_retries_read_on_from_the_same_document(corpus, capsys):
    """Failures that the libraries below give up on (four 503s, four stalls in a row) reach
    `text.resilient`, which reads again and yields every document once, in order."""
    from clt.config import DataConfig
    from clt.data.text import iter_documents, load_text_dataset

    want = [json.loads(line)["text"] for line in corpus.decode().splitlines()]
    server = FlakyServer(corpus)
    try:
        ds, col = load_text_dataset(DataConfig(dataset=server.url, stream_timeout=1))
        for fault in (("503",), ("stall", 2)):
            server.plan = {server.gets + k: fault for k in range(4)}
            got = list(iter_documents(ds, col, 1, ("the corpus", 5, 0.01)))
            assert got == want
        assert capsys.readouterr().err.count("retry 1 of 5") == 2
        server.fail_from = server.gets  # down for good: the budget runs out
        with pytest.raises(DataError, match="reading the corpus failed 3 times in a row at row 0"):
            list(iter_documents(ds, col, 1, ("the corpus", 2, 0.01)))
    finally:
        server.close()


def test_past_the_retry_budget_the_run_stops_checkpointed_and_resumes_exactly(
    tiny_model_dir, tmp_path, small_corpus
):
    n_gets = _unfaulted_run(tiny_model_dir, tmp_path / "clean", small_corpus)
    down = FlakyServer(small_corpus)
    assert n_gets >= 5  # (it was read again at each pass)
    down.fail_from = n_gets - 1  # the server goes down for good before the last read of the run
    extra = STREAM | {"data.dataset": down.url, "data.stream_retries": 2}
    try:
        with pytest.raises(DataError, match=r"failed 3 times in a row .*last finished step checkpointed"):
            run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **extra)))
        state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
        assert 0 < state["global_step"] < 12
        down.fail_from = None  # back up: the same command resumes
        run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **extra)))
    finally:
        down.close()
    a, b = _weights(tmp_path / "clean"), _weights(tmp_path / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- chaos ----------------------------------------------------------------------------------------------
def _chaos(tiny_model_dir, tmp_path, kills: int, seed: int) -> int:
    """A CPU run killed with SIGKILL `kills` times, each at a random moment or the instant a
    checkpoint file appears before its manifest (mid-write), restarted each time; its final
    weights must equal an uninterrupted run's bit for bit. Returns the kills that landed mid-write."""
    import random
    import signal
    import time

    extra = {
        "trainer.max_steps": 40,
        "trainer.ckpt_every": 3,
        "trainer.eval_every": 0,
        "trainer.log_every": 1,
    }
    run(compose(tiny_overrides(tiny_model_dir, tmp_path / "ref", **extra)))
    rng, mid_write, run_dir = random.Random(seed), 0, tmp_path / "run"
    d = run_dir / "checkpoints"
    for i in range(kills):
        proc = _start(tiny_model_dir, run_dir, **extra)
        at_checkpoint = i % 2 == 1
        seen = {p.name for p in d.glob("step-*.ckpt")} if d.exists() else set()
        deadline = time.time() + (60 if at_checkpoint else rng.uniform(4.0, 14.0))
        while time.time() < deadline and proc.poll() is None:
            if at_checkpoint and d.exists():
                fresh = [p for p in d.glob("step-*.ckpt") if p.name not in seen]
                if fresh:
                    mid_write += not (d / fresh[0].name.replace(".ckpt", ".sha256")).exists()
                    break
            time.sleep(0.001)
        if proc.poll() is not None:  # it finished before this kill: nothing left to interrupt
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run(compose(tiny_overrides(tiny_model_dir, run_dir, **extra)))  # the last restart, to the end
    a, b = _weights(tmp_path / "ref"), _weights(run_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    state = torch.load(d / "last.ckpt", weights_only=False)
    assert state["global_step"] == 40
    return mid_write


@pytest.mark.slow
def test_chaos_ten_random_kills_end_bit_identical(tiny_model_dir, tmp_path):
    _chaos(tiny_model_dir, tmp_path, kills=10, seed=0)


def test_chaos_two_kills_end_bit_identical(tiny_model_dir, tmp_path):
    _chaos(tiny_model_dir, tmp_path, kills=2, seed=1)


def test_a_full_disk_while_writing_the_report_keeps_the_run_and_says_so(
    tiny_model_dir, tmp_path, monkeypatch
):
    import errno

    import clt.report

    extra = {"trainer.eval_every": 0, "trainer.max_steps": 8, "report": True}
    real = clt.report.final_report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as mp:
        mp.setattr(clt.report, "final_report", full)
        with pytest.raises(
            TrainingError, match=r"writing the report to .* the disk is full .*step 8\) is intact"
        ):
            run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **extra)))
    before = _weights(tmp_path / "run")
    assert clt.report.final_report is real
    run(compose(tiny_overrides(tiny_model_dir, tmp_path / "run", **extra)))  # space freed: the report
    assert (tmp_path / "run" / "report.json").exists()
    after = _weights(tmp_path / "run")
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing trained twice
