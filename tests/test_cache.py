"""Activation cache (clt/data/activation_cache.py, python -m clt.cache): same batches as online generation,
resumable and splittable generation, global shuffle, checksums, bad input."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, cache_cli, tiny_overrides, train_cli

from clt.config import CacheConfig, CacheJobConfig, DataConfig, ModelConfig
from clt.data import ActivationSource, TextPosition, WindowStream
from clt.data import activation_cache as cache_mod
from clt.data.activation_cache import CachedActivations, CacheError, finalize, generate, shard_ok, shard_path

DATA = DataConfig(context_size=32, batch_windows=8, buffer_tokens=1024, eval_docs=2, eval_windows=4)
TOKENS, SHARD = 6000, 1000  # 31 tokens per window: 194 windows in 6 shards of 33 windows


@pytest.fixture(scope="module")
def model_cfg(tiny_model_dir):
    return ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32")


@pytest.fixture(scope="module")
def subject(model_cfg):
    from clt.subject import load_subject

    return load_subject(model_cfg)


def job(model_cfg, root, **cache) -> CacheJobConfig:
    c = CacheConfig(dir=str(root), tokens=TOKENS, shard_tokens=SHARD, task=0, tasks=1)
    return CacheJobConfig(model=model_cfg, data=DATA, cache=replace(c, **cache)).validate()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, subject, model_cfg):
    root = tmp_path_factory.mktemp("cache") / "bf16"
    generate(subject, job(model_cfg, root), progress=False)
    return root


def reader(root, subject, model_cfg, batch=128, seed=0, **data) -> CachedActivations:
    cfg = replace(DATA, cache=str(root), **data)
    return CachedActivations(subject, cfg, batch, seed=seed, model=model_cfg)


def take(it, n):
    return [next(it) for _ in range(n)]


def test_manifest_describes_the_cache(cache_dir, subject):
    m = json.loads((cache_dir / "manifest.json").read_text())
    assert m["n_shards"] == 6 and m["n_windows"] == 194 and m["tokens"] == 194 * 31
    assert m["subject"]["n_layers"] == subject.n_layers and m["subject"]["d_model"] == subject.d_model
    assert m["hooks"] == {"input": "resid_mid", "output": "mlp_out"} and m["storage"] == "bfloat16"
    assert sum(s["tokens"] for s in m["shards"]) == m["tokens"]
    # normalisation statistics = the mean norms over every cached token, computed here from the shards
    x = torch.cat([reader(cache_dir, subject, None).load_shard(s)[0] for s in range(6)])
    torch.testing.assert_close(
        torch.tensor(m["normalisation"]["x_norm_mean"]), x.float().norm(dim=-1).mean(0), rtol=1e-4, atol=0
    )


def test_stream_order_gives_the_online_batches(cache_dir, subject, model_cfg, tokenizer):
    """Same seed: the same tokens and the same activations (to bf16 precision) as online generation,
    and resuming from a batch's position continues identically."""
    online = ActivationSource(subject, DATA, 128, seed=3)
    cached = reader(cache_dir, subject, model_cfg, seed=3, cache_order="stream")
    a, b = take(online.batches(), 20), take(cached.batches(tokens=True), 20)
    for (x1, y1, _), (x2, y2, _, _) in zip(a, b):
        assert torch.equal(x1.bfloat16(), x2.bfloat16()) and torch.equal(y1.bfloat16(), y2.bfloat16())
    # tokens: the window stream's, permuted by the same generator as online
    stream = WindowStream(DATA, subject.tokenizer)
    wb = -(-DATA.buffer_tokens // 31)  # windows per shuffle block
    wins = [w for w, _ in take(stream.windows(TextPosition()), 2 * wb)]
    toks = torch.stack(wins)[:, 1:].reshape(-1)
    for blk in range(2):
        perm = torch.randperm(wb * 31, generator=torch.Generator().manual_seed(3 * 1_000_003 + blk))
        block_toks = toks[blk * wb * 31 : (blk + 1) * wb * 31][perm]
        for j in range(8):
            assert torch.equal(b[blk * 8 + j][2], block_toks[j * 128 : (j + 1) * 128])
    # the first activations (normalisation / initialisation) are the online ones
    xo, _ = online.first_activations(2)
    xc, _ = cached.first_activations(2)
    assert torch.equal(xo.bfloat16(), xc.bfloat16())
    # resume after batch 11
    again = take(cached.batches(b[10][3]), 5)
    for (x1, _, p1), (x2, _, _, p2) in zip(again, b[11:16]):
        assert torch.equal(x1, x2) and p1 == p2


def test_global_order_visits_every_token_once_per_pass(cache_dir, subject, model_cfg, monkeypatch):
    src = reader(cache_dir, subject, model_cfg, batch=100, cache_order="global")
    offsets = [0]
    for sh in src.manifest["shards"]:
        offsets.append(offsets[-1] + sh["tokens"])
    real = CachedActivations.load_shard

    def numbered(self, s):  # x[:, 0, 0] = the token's global row number in the cache (a fingerprint)
        x, y, tok = real(self, s)
        x = x.clone()
        x[:, 0, 0] = torch.arange(offsets[s], offsets[s + 1], dtype=x.dtype)
        return x, y, tok

    monkeypatch.setattr(CachedActivations, "load_shard", numbered)

    def rows_of(x):
        return x[:, 0, 0].long()

    all_rows = torch.arange(offsets[-1])
    group = -(-DATA.buffer_tokens // (33 * 31))  # shards mixed at a time
    assert group == 2
    sizes = [
        sum(src.manifest["shards"][s]["tokens"] for s in range(g, min(g + group, 6)))
        for g in range(0, 6, group)
    ]
    per_pass = sum(n // 100 for n in sizes)
    it = src.batches()
    first = take(it, per_pass)
    rows = torch.cat([rows_of(x) for x, _, _ in first])
    assert len(torch.unique(rows)) == len(rows) == per_pass * 100  # no token twice in a pass
    assert torch.isin(rows, all_rows).all()  # all from the cache
    assert first[-1][2]["cache"] == {"epoch": 0, "block": 3, "batch": 0}  # = the start of pass 1
    second = torch.cat([rows_of(x) for x, _, _ in take(it, per_pass)])
    assert not torch.equal(rows, second)  # a new order every pass
    # a batch mixes shards from both halves of the corpus (global, not sequential)
    owner = torch.bucketize(rows_of(first[0][0]), torch.tensor(offsets[1:]), right=True)
    mixed = set(owner.tolist())
    assert len(mixed) == group
    # exact resume mid-pass, and data-parallel replicas split each global batch
    pos = first[4][2]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(take(src.batches(pos), 3), first[5:8]))
    r0 = reader(cache_dir, subject, model_cfg, batch=100)
    r1 = reader(cache_dir, subject, model_cfg, batch=100)
    r0.split_for_replica(0, 2, 100)
    r1.split_for_replica(1, 2, 100)
    for (a, _, _), (b, _, _), (g, _, _) in zip(take(r0.batches(), 3), take(r1.batches(), 3), first[:3]):
        assert torch.equal(torch.cat([a, b]), g)


def test_interrupted_generation_resumes_to_the_same_manifest(
    tmp_path, cache_dir, subject, model_cfg, monkeypatch
):
    root = tmp_path / "c"
    real, calls = cache_mod.write_shard, []

    def crash_after_two(*args, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-generation
        calls.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(cache_mod, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate(subject, job(model_cfg, root), progress=False)
    assert not (root / "manifest.json").exists() and calls == [0, 1]
    monkeypatch.setattr(cache_mod, "write_shard", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    manifest = generate(subject, job(model_cfg, root), progress=False)
    assert calls == [0, 1, 2, 3, 4, 5]  # shards 0 and 1 were kept, not regenerated
    assert manifest == json.loads((cache_dir / "manifest.json").read_text())


def test_array_tasks_write_disjoint_slices_that_merge(tmp_path, cache_dir, subject, model_cfg):
    root = tmp_path / "array"
    assert generate(subject, job(model_cfg, root, task=1, tasks=2), progress=False) is None  # 3 of 6 shards
    assert sorted(p.name for p in (root / "shards").glob("*.json")) == [
        f"shard-00000{i}.json" for i in (3, 4, 5)
    ]
    with pytest.raises(CacheError, match=r"3 of 6 shards are missing \(0–2\)"):
        finalize(root)
    with pytest.raises(CacheError, match="missing"):
        reader(root, subject, model_cfg)
    generate(subject, job(model_cfg, root, task=0, tasks=2), progress=False)
    assert json.loads((root / "manifest.json").read_text()) == json.loads(
        (cache_dir / "manifest.json").read_text()
    )
    # `python -m clt.cache merge` re-checks every checksum and writes the same manifest
    done = subprocess.run(
        [sys.executable, "-m", "clt.cache", "merge", str(root)], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "every checksum ok" in done.stdout


def test_damaged_shards_are_detected_and_only_they_regenerated(
    tmp_path, cache_dir, subject, model_cfg, capsys
):
    root = tmp_path / "damaged"
    shutil.copytree(cache_dir, root)
    p2, p3 = shard_path(root, 2), shard_path(root, 3)
    data = bytearray(p2.read_bytes())
    data[-100] ^= 0xFF  # one flipped bit pattern inside the tensors
    p2.write_bytes(bytes(data))
    p3.write_bytes(p3.read_bytes()[:-4096])  # truncated
    src = reader(root, subject, model_cfg)
    with pytest.raises(CacheError, match=r"shard-000002.safetensors is corrupted: sha256"):
        src.load_shard(2)
    with pytest.raises(CacheError, match=r"shard-000003.safetensors is truncated"):
        src.load_shard(3)
    src.load_shard(1), src.load_shard(4)  # the others are intact
    assert shard_ok(root, 1, verify=True) and not shard_ok(root, 2, verify=True)
    bad = subprocess.run(
        [sys.executable, "-m", "clt.cache", "verify", str(root)], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "shards 2–3 are damaged" in bad.stderr
    mtime = shard_path(root, 1).stat().st_mtime_ns
    manifest = generate(subject, job(model_cfg, root), progress=False)  # regenerates 2 and 3 only
    assert "shard 2: incomplete or damaged" in capsys.readouterr().out
    assert shard_path(root, 1).stat().st_mtime_ns == mtime
    assert manifest == json.loads((cache_dir / "manifest.json").read_text())


def test_full_disk_is_a_clear_error_and_keeps_finished_shards(tmp_path, subject, model_cfg, monkeypatch):
    root = tmp_path / "full"
    real, n = cache_mod.save_file, []

    def save(tensors, path, metadata=None):
        if "shard-000002" in str(path):
            Path(path).write_bytes(b"partial")  # the disk fills up mid-write
            raise OSError(errno.ENOSPC, "No space left on device")
        n.append(path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(cache_mod, "save_file", save)
    with pytest.raises(
        CacheError, match=r"writing shard 2 .* the disk is full\. The 2 finished shards are intact"
    ):
        generate(subject, job(model_cfg, root), progress=False)
    assert shard_ok(root, 0, verify=True) and shard_ok(root, 1, verify=True)
    assert sorted(p.name for p in (root / "shards").iterdir()) == [
        "shard-000000.json",
        "shard-000000.safetensors",
        "shard-000001.json",
        "shard-000001.safetensors",
    ]


def test_cache_of_another_model_or_hook_is_refused(tmp_path, cache_dir, subject, model_cfg):
    with pytest.raises(CacheError, match="this run's subject model is 'other/model'"):
        reader(cache_dir, subject, replace(model_cfg, name_or_path="other/model"))
    with pytest.raises(CacheError, match="model.input_hook"):
        reader(cache_dir, subject, replace(model_cfg, input_hook="mlp_in"))

    class Wider:
        n_layers, d_model = 3, 64

    with pytest.raises(CacheError, match="mismatched L or d"):
        CachedActivations(Wider(), replace(DATA, cache=str(cache_dir)), 128, model=model_cfg)
    # generating into a cache made with other settings
    with pytest.raises(
        CacheError, match=r"holds another cache .*hooks.input: cache has 'resid_mid', asked 'mlp_in'"
    ):
        from clt.subject import load_subject

        other = replace(model_cfg, input_hook="mlp_in")
        generate(
            load_subject(other),
            CacheJobConfig(
                model=other,
                data=DATA,
                cache=CacheConfig(dir=str(cache_dir), tokens=TOKENS, shard_tokens=SHARD, task=0, tasks=1),
            ),
            progress=False,
        )
    with pytest.raises(CacheError, match="not an activation cache"):
        reader(tmp_path, subject, model_cfg)


def test_int8_storage_halves_the_size_at_small_error(tmp_path, cache_dir, subject, model_cfg):
    root = tmp_path / "int8"
    m8 = generate(subject, job(model_cfg, root, dtype="int8"), progress=False)
    m16 = json.loads((cache_dir / "manifest.json").read_text())
    size8, size16 = sum(s["bytes"] for s in m8["shards"]), sum(s["bytes"] for s in m16["shards"])
    assert size8 < 0.6 * size16
    online = ActivationSource(subject, DATA, 128)
    x, y = online.first_activations(4)  # fp32 activations of the first 32 windows
    xq, yq = reader(root, subject, model_cfg).first_activations(4)
    for ref, q in ((x, xq), (y, yq)):  # quantisation error as a fraction of the variance (FVU)
        fvu = (q - ref).pow(2).sum() / (ref - ref.mean(0)).pow(2).sum()
        assert fvu < 1e-3, fvu


def test_train_from_cache_matches_online_and_resumes(tmp_path, cache_dir, tiny_model_dir):
    """python train.py data=cached …: stream order = the online run (bf16 buffer), weights equal;
    stopped at 10 steps and resumed to 20 = 20 steps straight."""
    from clt.io import load_clt

    cached = ["data=cached", f"data.cache={cache_dir}", "data.cache_order=stream"]
    runs = {
        "online": ["data.buffer_dtype=bfloat16"],
        "cached": cached,
        "half": cached + ["trainer.max_steps=10"],
    }
    common = {"trainer.eval_every": 0, "optim.decay_frac": 0}  # a schedule that does not depend on max_steps
    for name, extra in runs.items():
        done = train_cli(tiny_overrides(tiny_model_dir, tmp_path / name, **common) + extra)
        assert done.returncode == 0, done.stderr[-3000:]
    done = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "half", **common) + cached)
    assert done.returncode == 0, done.stderr[-3000:]
    ref = load_clt(tmp_path / "online" / "clt").state_dict()
    for name in ("cached", "half"):
        got = load_clt(tmp_path / name / "clt").state_dict()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    saved = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert saved["data"]["cache"] == str(cache_dir) and saved["data"]["context_size"] == 32
    # a cache of other hooks: one clear line, exit 2
    bad = train_cli(tiny_overrides(tiny_model_dir, tmp_path / "bad") + cached + ["model.input_hook=mlp_in"])
    assert bad.returncode == 2 and "model.input_hook" in bad.stderr and "Traceback" not in bad.stderr


def test_cache_cli_generates_a_cache(tmp_path, tiny_model_dir):
    root = tmp_path / "cli"
    done = subprocess.run(
        cache_cli(tiny_model_dir, root, 2000),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train with data=cached" in done.stdout
    assert json.loads((root / "manifest.json").read_text())["n_shards"] == 2
    bad = subprocess.run(
        [sys.executable, "-m", "clt.cache", "cache.dtype=fp8", f"cache.dir={root}"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "cache.dtype='fp8' is invalid" in bad.stderr


def test_a_cache_written_by_earlier_code_still_reads(tmp_path):
    """tests/assets/cache-format1: a 240-token cache of a tiny random Llama (recorded as
    "tiny-llama") written by the code of 2026-12-02 (commit 82d77a6), with the first batch its
    reader gave in stream and global order. Today's reader verifies every checksum and gives the
    same batches."""
    root = tmp_path / "cache"
    shutil.copytree(REPO / "tests" / "assets" / "cache-format1", root)
    recorded = torch.load(REPO / "tests" / "assets" / "cache-format1-batches.pt", weights_only=True)
    finalize(root, required=True, verify=True)
    model = ModelConfig(name_or_path="tiny-llama", dtype="float32")
    data = DataConfig(context_size=16, batch_windows=4, buffer_tokens=256, eval_docs=1, eval_windows=2)
    for order in ("stream", "global"):
        src = CachedActivations(
            None, replace(data, cache=str(root), cache_order=order), 64, seed=0, model=model
        )
        x, y, pos = next(src.batches())
        assert torch.equal(x, recorded[order]["x"].float()) and torch.equal(y, recorded[order]["y"].float())
        assert json.dumps(pos) == recorded[order]["position"]
    with pytest.raises(CacheError, match="subject model"):
        CachedActivations(
            None, replace(data, cache=str(root)), 64, model=replace(model, name_or_path="other")
        )
