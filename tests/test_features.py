"""Feature cards (clt/features): the streaming pass against brute force on a planted activation
cache, exactness under batch size / task split / kill -9, the weight-only parts against explicit
products, the store's binary format, and bad input."""

from __future__ import annotations

import errno
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

from clt.config import DataConfig, FeaturesConfig, FeaturesJobConfig, ModelConfig
from clt.data.activation_cache import finalize, make_plan, write_or_check_plan, write_shard
from clt.features import FeatureError, FeatureStore
from clt.features.accumulate import (
    BINS_PER_DECADE,
    N_STRATA,
    STRATA_PER_DECADE,
    CardAccumulator,
    SlotBuffer,
    bin_edges,
    group_sort,
    lexsort,
    log_bin,
    stratum_of_bin,
)
from clt.features.pipeline import Batch, compute_store, scan_batch
from clt.features.store import cantor
from clt.model import CLTArchitecture, CrossLayerTranscoder

L, D = 3, 32  # the tiny subject model (conftest.tiny_model_dir): 3 layers, d = 32
PER = 15  # tokens per window of the planted cache (context 16, BOS dropped)
WINDOWS = 48
N = PER * WINDOWS
TOP_K, LEFT, RIGHT = 4, 5, 3


# ---------------------------------------------------------------------------------------------
# A planted activation cache and a CLT whose activations are exactly the planted values


def planted(seed: int = 0):
    """x: [N, L, d] with x = −1 (→ no activation) except ~8% planted values in {0.25, …, 4}
    (exact in bf16, many ties); tokens [N]; docs [N] (documents of 5–60 tokens, across windows)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((N, L, D), -1.0)
    mask = torch.rand(N, L, D, generator=g) < 0.08
    x[mask] = torch.randint(1, 17, (N, L, D), generator=g).float()[mask] / 4
    lengths = torch.randint(5, 60, (N,), generator=g)
    docs = torch.repeat_interleave(torch.arange(N), lengths)[:N]
    tokens = torch.randint(0, 500, (N,), generator=g)
    return x, tokens, docs


def write_planted_cache(root: Path, model_dir, x, tokens, docs, shard_windows: int = 7) -> Path:
    subject = SimpleNamespace(family_name="llama", dtype=torch.float32, n_layers=L, d_model=D)
    data = DataConfig(context_size=PER + 1)
    plan = make_plan(
        subject, ModelConfig(name_or_path=str(model_dir)), data, N, shard_windows * PER, "bfloat16"
    )
    write_or_check_plan(root, plan)
    for s in range(plan["n_shards"]):
        w0, w1 = s * shard_windows, min((s + 1) * shard_windows, WINDOWS)
        rows = slice(w0 * PER, w1 * PER)
        win = torch.cat([torch.zeros(w1 - w0, 1, dtype=torch.long), tokens[rows].view(-1, PER)], 1)
        doc = torch.cat([docs[rows].view(-1, PER)[:, :1], docs[rows].view(-1, PER)], 1)
        write_shard(root, s, w0, win, doc, x[rows], torch.zeros_like(x[rows]), "bfloat16")
    finalize(root)
    return root


def identity_clt(model_dir) -> CrossLayerTranscoder:
    """ReLU CLT with W_enc = I, b_enc = 0: a_l = relu(x_l) exactly (d_sae = d)."""
    clt = CrossLayerTranscoder(
        CLTArchitecture(n_layers=L, d_model=D, d_sae=D, activation="relu", subject_model=str(model_dir))
    )
    with torch.no_grad():
        clt.W_enc.copy_(torch.eye(D).expand(L, D, D))
        clt.b_enc.zero_()
    return clt


def job(checkpoint, out, cache=None, **f) -> FeaturesJobConfig:
    fc = FeaturesConfig(
        checkpoint=str(checkpoint),
        out=str(out),
        tokens=N,
        batch_windows=5,
        top_k=TOP_K,
        context_left=LEFT,
        context_right=RIGHT,
        stratum_samples=2,
        task=0,
        tasks=1,
    )
    data = DataConfig(context_size=PER + 1, cache=str(cache) if cache else None)
    return FeaturesJobConfig(
        model=ModelConfig(name_or_path="", dtype="float32"), data=data, features=replace(fc, **f)
    ).validate()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("features")
    x, tokens, docs = planted()
    cache = write_planted_cache(root / "cache", tiny_model_dir, x, tokens, docs)
    clt = identity_clt(tiny_model_dir)
    clt.save_pretrained(root / "clt")
    store = compute_store(job(root / "clt", root / "store", cache), progress=False)
    return SimpleNamespace(
        root=root, x=x, tokens=tokens, docs=docs, cache=cache, clt=clt, store=store, model_dir=tiny_model_dir
    )


def brute_force_top(a: torch.Tensor, docs: torch.Tensor, k: int) -> list[tuple[float, int]]:
    """a: [N] one feature's activations -> the k best documents' best tokens, by (value desc, position)."""
    best: dict[int, tuple[float, int]] = {}
    for g in torch.nonzero(a > 0).flatten().tolist():
        key = (-float(a[g]), g)
        d = int(docs[g])
        if d not in best or key < best[d]:
            best[d] = key
    return sorted(best.values())[:k]


def store_records(store) -> list[dict]:
    st = FeatureStore(store)
    return [st.record(layer, f) for layer in range(L) for f in range(D)]


# ---------------------------------------------------------------------------------------------
# The pass against brute force


def test_cards_equal_brute_force_on_planted_activations(setup):
    st = FeatureStore(setup.store)
    assert st.manifest["n_tokens"] == N
    a = setup.x.clamp(min=0)
    for layer in range(L):
        for f in range(D):
            card = st.card(layer, f)
            v = a[:, layer, f]
            nz = v[v > 0]
            assert card.count == len(nz) and card.activation_frequency == len(nz) / N
            assert card.act_max == float(nz.max()) and card.min_activation == float(nz.min())
            assert card.mean_activation == pytest.approx(float(nz.double().mean()), rel=1e-12)
            assert sum(card.histogram) == card.count and sum(card.log_histogram) == card.count
            q = card.quantile_values
            assert len(q) == 100 and all(q[i] <= q[i + 1] for i in range(99)) and q[-1] <= card.act_max
            assert q[0] >= card.min_activation
            top = card.examples_quantiles[0]
            assert top.quantile_name == "Top"
            want = brute_force_top(v, setup.docs, TOP_K)
            got = [(-ex.tokens_acts_list[ex.train_token_ind], ex.token_index) for ex in top.examples]
            assert got == want, (layer, f)
            assert len({ex.document for ex in top.examples}) == len(top.examples)  # one per document
            for ex in top.examples:  # the context: same window, same document, activations shown
                g = ex.token_index
                w0 = g // PER * PER
                ctx = [
                    p
                    for p in range(g - LEFT, g + RIGHT + 1)
                    if w0 <= p < w0 + PER and setup.docs[p] == setup.docs[g]
                ]
                assert ex.token_ids == setup.tokens[ctx].tolist()
                assert ex.train_token_ind == ctx.index(g)
                assert ex.tokens_acts_list == pytest.approx(v[ctx].tolist())
                assert ex.document == int(setup.docs[g])


def test_ties_and_document_dedup_are_exercised(setup):
    """The planted data must contain what the brute-force test claims to check: ties in the top
    values, documents with several firing tokens, documents split across windows and batches."""
    a = setup.x.clamp(min=0)
    tie_features = doc_repeats = 0
    for layer in range(L):
        for f in range(D):
            v = a[:, layer, f]
            top_vals = v.topk(TOP_K + 2).values
            tie_features += int((top_vals[1:] == top_vals[:-1]).any())
            fired_docs = setup.docs[v > 0]
            doc_repeats += int(len(fired_docs) > len(torch.unique(fired_docs)))
    assert tie_features > 10 and doc_repeats > 10
    crossing = (setup.docs.view(WINDOWS, PER)[:, 0] == setup.docs.view(WINDOWS, PER)[:, -1]).sum()
    assert crossing > 0 and (setup.docs[PER::PER] == setup.docs[PER - 1 : -1 : PER]).any()


@pytest.mark.parametrize("batch_windows", [1, 7, WINDOWS])
def test_any_batch_size_gives_the_same_store(setup, batch_windows):
    other = compute_store(
        job(setup.root / "clt", setup.root / f"bw{batch_windows}", setup.cache, batch_windows=batch_windows),
        progress=False,
    )
    assert store_records(other) == store_records(setup.store)


def test_array_tasks_merge_to_the_same_store(setup):
    out = setup.root / "tasks"
    assert compute_store(job(setup.root / "clt", out, setup.cache, task=1, tasks=3), progress=False) is None
    assert compute_store(job(setup.root / "clt", out, setup.cache, task=2, tasks=3), progress=False) is None
    assert not out.exists()
    assert compute_store(job(setup.root / "clt", out, setup.cache, task=0, tasks=3), progress=False) == out
    assert store_records(out) == store_records(setup.store)
    assert not out.with_name("tasks.work").exists()  # the work directory is gone once the store is written


def test_accumulator_merge_is_independent_of_batch_order(setup):
    """Batches offered in shuffled order, and two accumulators merged either way round, give the
    same statistics and buffers as the stream in order."""
    a = setup.x.clamp(min=0)

    def run(order, w_lo=0, w_hi=WINDOWS):
        acc = CardAccumulator(L, D, TOP_K, 2, LEFT, RIGHT)
        for w in order:
            if not w_lo <= w < w_hi:
                continue
            rows = slice(w * PER, (w + 1) * PER)
            for layer in range(L):
                acc.update(layer, a[rows, layer], setup.tokens[rows], setup.docs[rows], w * PER, PER)
            acc.add_tokens(PER)
        return acc

    ref = run(range(WINDOWS))
    shuffled = run(torch.randperm(WINDOWS, generator=torch.Generator().manual_seed(1)).tolist())
    first, second = run(range(WINDOWS), 0, 20), run(range(WINDOWS), 20, WINDOWS)
    second.merge(first)
    for other in (shuffled, second):
        assert_same_state(other, ref)


def assert_same_state(got: CardAccumulator, want: CardAccumulator, rows=None) -> None:
    """Equal statistics and buffers (of accumulator rows `rows` of `want`, default all)."""
    rows = torch.arange(want.hist.shape[0]) if rows is None else rows
    strata = (rows[:, None] * N_STRATA + torch.arange(N_STRATA)).flatten()
    assert got.n_tokens == want.n_tokens
    for k in CardAccumulator.STATS:
        assert torch.equal(getattr(got, k), getattr(want, k)[rows]), k
    for buf, r in (("top", rows), ("strata", strata)):
        for k in SlotBuffer.FIELDS:
            assert torch.equal(getattr(getattr(got, buf), k), getattr(getattr(want, buf), k)[r]), (buf, k)


def planted_batches(x, tokens, docs, windows: int = 5):
    for w0 in range(0, WINDOWS, windows):
        rows = slice(w0 * PER, min(w0 + windows, WINDOWS) * PER)
        yield Batch(w0, x[rows], tokens[rows], docs[rows], {})


@pytest.mark.parametrize("max_elements", [1 << 26, PER * 5 * D])  # all layers together, one at a time
def test_topk_entries_and_stacked_layers_give_the_dense_scan_state(setup, max_elements):
    """A TopK CLT through scan_batch (TopK's own indices as the entries, the layers in one
    stacked buffer) against each layer's dense activations scanned one update at a time."""
    clt = identity_clt(setup.model_dir)
    clt.arch = replace(clt.arch, activation="topk", k=3)
    fast, dense = CardAccumulator(L, D, TOP_K, 2, LEFT, RIGHT), CardAccumulator(L, D, TOP_K, 2, LEFT, RIGHT)
    for b in planted_batches(setup.x, setup.tokens, setup.docs):
        scan_batch(fast, clt, b, PER, 0.0, max_elements)
        for layer in range(L):
            dense.update(layer, clt.encode_layer(b.x[:, layer], layer), b.tokens, b.docs, b.w0 * PER, PER)
        dense.add_tokens(len(b.tokens))
    assert dense.hist.sum() > 0.5 * N * L * 3  # TopK fired (3 per token and layer, where x > 0)
    assert_same_state(fast, dense)


def test_the_sorted_grouping_gives_the_dense_table_state(setup, monkeypatch):
    """The top-k pass's fallback for batches with too many (feature, document) cells for a table
    (filter by the buffer's worst, then torch.unique) against the table."""
    import clt.features.accumulate as acc_module

    def run():
        acc = CardAccumulator(L, D, TOP_K, 2, LEFT, RIGHT)
        for b in planted_batches(setup.x, setup.tokens, setup.docs):
            scan_batch(acc, setup.clt, b, PER, 0.0)
        return acc

    table = run()
    monkeypatch.setattr(acc_module, "TABLE_PER_ENTRY", 0)
    monkeypatch.setattr(acc_module, "TABLE_MIN", 0)
    assert_same_state(run(), table)


def test_a_feature_selection_gives_those_rows_of_the_full_pass(setup):
    sel = [torch.tensor([3, 0, 17]), None, torch.tensor([31])]
    part = CardAccumulator(L, D, TOP_K, 2, LEFT, RIGHT, features=sel)
    full = CardAccumulator(L, D, TOP_K, 2, LEFT, RIGHT)
    for b in planted_batches(setup.x, setup.tokens, setup.docs):
        scan_batch(part, setup.clt, b, PER, 0.0)
        scan_batch(full, setup.clt, b, PER, 0.0)
    rows = torch.cat([torch.tensor([3, 0, 17]), D + torch.arange(D), torch.tensor([2 * D + 31])])
    assert_same_state(part, full, rows)


def test_fast_kernels_equal_their_definitions():
    """log_bin's float32 bit table against torch.bucketize (at every edge, one ulp either side,
    and over 12 decades); histogram bins to strata against log_bin at the strata resolution;
    the packed one-sort group_sort against the three-key lexsort, ties included."""
    g = torch.Generator().manual_seed(0)
    for per in (BINS_PER_DECADE, STRATA_PER_DECADE):
        e = bin_edges(per).float()
        v = torch.cat(
            [
                e,
                e.nextafter(torch.tensor(0.0)),
                e.nextafter(torch.tensor(1e30)),
                torch.exp(torch.randn(200_000, generator=g) * 6),
                torch.tensor([1e-45, 1e-38, 3e38, float("inf")]),
            ]
        )
        assert torch.equal(log_bin(v, per), torch.bucketize(v, e, right=True)), per
        assert torch.equal(log_bin(v.double(), per), torch.bucketize(v.double(), bin_edges(per), right=True))
    assert torch.equal(stratum_of_bin(log_bin(v, BINS_PER_DECADE)), log_bin(v, STRATA_PER_DECADE))
    for n_groups, n in ((7, 50), (300_000, 5000)):
        group = torch.randint(0, n_groups, (n,), generator=g)
        order = torch.randn(n, generator=g, dtype=torch.float64) * 1e3
        order[::3] = order[1::3][: len(order[::3])]  # ties in order, broken by idx
        order[::7] = float("inf")
        order = torch.where(torch.rand(n, generator=g) < 0.3, order.round(), order)
        idx = torch.randperm(n, generator=g)
        assert torch.equal(group_sort(group, order, idx, n_groups), lexsort(group, order, idx))
        distinct = torch.randperm(n, generator=g).double() - n / 2  # no ties: the one-sort path
        assert torch.equal(group_sort(group, distinct, idx, n_groups), lexsort(group, distinct, idx))


def test_interval_samples_lie_in_their_intervals(setup):
    st = FeatureStore(setup.store)
    seen = 0
    for layer in range(L):
        for f in range(D):
            card = st.card(layer, f)
            a = setup.x[:, layer, f].clamp(min=0)
            for grp in card.examples_quantiles[1:]:
                assert (
                    grp.quantile_name.startswith("Interval ")
                    and f"{100 * grp.share:.3g}%" in grp.quantile_name
                )
                for ex in grp.examples:
                    v = ex.tokens_acts_list[ex.train_token_ind]
                    assert grp.lo < v <= grp.hi + 1e-6 and v == float(a[ex.token_index])
                    seen += 1
            assert sum(g.share for g in card.examples_quantiles[1:]) == pytest.approx(1.0)
    assert seen > 100


def test_kill_9_mid_pass_resumes_to_the_same_store(setup):
    """A real SIGKILL while the pass runs (resume points after every batch), then the same command:
    the store equals the uninterrupted one."""
    out = setup.root / "killed"
    args = [
        sys.executable,
        "-m",
        "clt.features",
        str(setup.root / "clt"),
        f"features.out={out}",
        f"data.cache={setup.cache}",
        f"data.context_size={PER + 1}",
        f"features.tokens={N}",
        "features.batch_windows=1",
        "features.save_every=1",
        f"features.top_k={TOP_K}",
        f"features.context_left={LEFT}",
        f"features.context_right={RIGHT}",
        "features.stratum_samples=2",
        "features.task=0",
        "features.tasks=1",
        "model.dtype=float32",
        "device=cpu",
    ]
    env = os.environ | {"CLT_FEATURES_BATCH_DELAY": "0.05"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = out.with_name("killed.work") / "task-000-of-001.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            saved = torch.load(state, weights_only=False)
            if saved["resume"]["window"] >= 5:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    saved = torch.load(state, weights_only=False)
    assert not saved["done"] and 5 <= saved["resume"]["window"] < WINDOWS and not out.exists()
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming task 0/1 at window {saved['resume']['window']}" in done.stdout
    assert store_records(out) == store_records(setup.store)


# ---------------------------------------------------------------------------------------------
# On a real subject: re-encoding, logit effects, virtual weights


@pytest.fixture(scope="module")
def real(tmp_path_factory, tiny_model_dir):
    """A random JumpReLU CLT (non-trivial normalisation) on the tiny Llama, whose final norm gain is
    made non-uniform, with cards from a real activation cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clt.config import CacheConfig, CacheJobConfig
    from clt.data.activation_cache import generate
    from clt.subject import load_subject

    root = tmp_path_factory.mktemp("real")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, D))
    model.save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(root / "model")
    mcfg = ModelConfig(name_or_path=str(root / "model"), dtype="float32")
    subject = load_subject(mcfg)
    data = DataConfig(context_size=32, eval_docs=2)
    generate(
        subject,
        CacheJobConfig(
            model=mcfg,
            data=data,
            cache=CacheConfig(dir=str(root / "cache"), tokens=3000, shard_tokens=1000, task=0, tasks=1),
        ).validate(),
        progress=False,
    )
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(
        CLTArchitecture(
            n_layers=L, d_model=D, d_sae=48, activation="jumprelu", subject_model=str(root / "model")
        ),
        threshold_init=0.05,
    )
    with torch.no_grad():
        clt.input_scale.copy_(torch.tensor([2.0, 0.5, 1.5]))
        clt.output_scale.copy_(torch.tensor([0.7, 1.3, 2.0]))
        clt.b_enc.normal_(0, 0.05)
    clt.save_pretrained(root / "clt")
    fjob = FeaturesJobConfig(
        model=ModelConfig(name_or_path="", dtype="float32"),
        data=replace(data, cache=str(root / "cache")),
        features=FeaturesConfig(checkpoint=str(root / "clt"), tokens=3000, task=0, tasks=1),
    )
    store = compute_store(fjob.validate(), subject=subject, progress=False)
    return SimpleNamespace(root=root, clt=clt, subject=subject, store=store, cache=root / "cache", data=data)


def test_reencoding_the_cached_input_at_a_peak_reproduces_it(real):
    from clt.data.activation_cache import CachedActivations

    reader = CachedActivations(None, replace(real.data, cache=str(real.cache)), 1)
    per, sw = reader.per, reader.sw
    st = FeatureStore(real.store)
    checked = 0
    for layer in range(L):
        for f in range(real.clt.d_sae):
            for grp in st.card(layer, f).examples_quantiles:
                for ex in grp.examples:
                    w, r = divmod(ex.token_index, per)
                    x = reader.shard_tensors(w // sw)["x"][(w % sw) * per + r]  # [L, d]
                    a = real.clt.eval().encode_layer(x[None, layer], layer)[0, f]
                    assert float(a) == pytest.approx(
                        ex.tokens_acts_list[ex.train_token_ind], rel=1e-5, abs=1e-6
                    )
                    checked += 1
    assert checked > 200


def test_logit_effects_use_every_target_layer(real):
    """top/bottom logits = topk(W_U · (γ ⊙ Σ_t W_dec[s→t][f])) in subject units, computed here
    from the raw weights; using only the same-layer decoder would give other tokens."""
    st = FeatureStore(real.store)
    clt, lm = real.clt, real.subject.model
    W_U = lm.lm_head.weight.float()
    gamma = lm.model.norm.weight.float()
    differ = 0
    for s in range(L):
        for f in range(clt.d_sae):
            rows = clt.W_dec[s][f].detach()  # [L − s, d], normalised units
            v = (rows / clt.output_scale[s:, None]).sum(0)  # Σ_t W_dec[s→t][f] / s_out[t]
            logits = W_U @ (gamma * v)
            card = st.card(s, f)
            assert card.top_logit_ids == logits.topk(10).indices.tolist()
            assert card.bottom_logit_ids == logits.topk(10, largest=False).indices.tolist()
            assert card.top_logit_values == pytest.approx(logits.topk(10).values.tolist(), rel=1e-4, abs=1e-6)
            same_layer = W_U @ (gamma * rows[0] / clt.output_scale[s])
            differ += same_layer.topk(10).indices.tolist() != card.top_logit_ids
            norms = (rows / clt.output_scale[s:, None]).norm(dim=-1)
            assert card.decoder_norms == pytest.approx(norms.tolist(), rel=1e-5)
    assert differ > clt.d_sae  # the test can tell the two apart


def test_virtual_weight_neighbours_equal_the_explicit_product(real):
    st = FeatureStore(real.store)
    clt = real.clt.folded()
    F = clt.d_sae
    V = {}  # (s, f, t, g) -> W_enc[t][g] · Σ_{s ≤ l < t} W_dec[s→l][f]
    for s in range(L):
        for t in range(s + 1, L):
            cum = sum(clt.W_dec[s][:, l - s] for l in range(s, t)).detach()  # [F, d]
            M = cum @ clt.W_enc[t].detach().T  # [F, F]
            for f in range(F):
                for g in range(F):
                    V[(s, f, t, g)] = float(M[f, g])
    for layer in range(L):
        for f in range(F):
            card = st.card(layer, f)
            down = sorted(
                ((abs(w), (t, g)) for (s, ff, t, g), w in V.items() if (s, ff) == (layer, f)),
                key=lambda x: -x[0],
            )[:10]
            up = sorted(
                ((abs(w), (s, ff)) for (s, ff, t, g), w in V.items() if (t, g) == (layer, f)),
                key=lambda x: -x[0],
            )[:10]
            assert [(n.layer, n.feature) for n in card.downstream] == [k for _, k in down]
            assert [(n.layer, n.feature) for n in card.upstream] == [k for _, k in up]
            for n in card.downstream:
                assert n.weight == pytest.approx(V[(layer, f, n.layer, n.feature)], rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# The store's format


def test_store_format(setup):
    root = Path(setup.store)
    index = json.loads(gzip.decompress((root / "index.json.gz").read_bytes()))
    assert sorted(index, key=int) == [str(layer) for layer in range(L)]
    manifest = json.loads((root / "manifest.json").read_text())
    from clt.features.store import clt_checksum
    from clt.files import sha256

    assert manifest["clt"]["checksum"] == clt_checksum(setup.clt) and manifest["complete"]
    for name, meta in manifest["files"].items():
        assert (root / name).stat().st_size == meta["bytes"] and sha256(root / name) == meta["sha256"]
    for layer in range(L):
        entry = index[str(layer)]
        assert entry["filename"] == f"layer_{layer}.bin"
        offsets = entry["offsets"]
        blob = (root / entry["filename"]).read_bytes()
        assert len(offsets) == D + 1 and offsets[0] == 0 and offsets[-1] == len(blob)
        assert all(a < b for a, b in zip(offsets, offsets[1:]))
        for f in range(D):
            rec = blob[offsets[f] : offsets[f + 1]]
            (n,) = struct.unpack("<I", rec[:4])
            assert n == len(rec) - 4
            card = json.loads(gzip.decompress(rec[4:]))
            assert card["index"] == cantor(layer, f) and (card["layer"], card["feature"]) == (layer, f)
            for grp in card["examples_quantiles"]:
                for ex in grp["examples"]:
                    assert len(ex["tokens"]) == len(ex["tokens_acts_list"]) == len(ex["token_ids"])
                    assert 0 <= ex["train_token_ind"] < len(ex["tokens"])
            from clt.features.store import FeatureCard

            FeatureCard.from_json(card)  # the typed schema


def test_circuit_tracer_feature_model_accepts_the_records(setup):
    """circuit-tracer's own pydantic feature model (installed without its dependencies)."""
    feature_models = pytest.importorskip("circuit_tracer.frontend.feature_models")
    st = FeatureStore(setup.store)
    for layer in range(L):
        for f in range(0, D, 5):
            m = feature_models.Model.model_validate(st.record(layer, f))
            assert m.index == cantor(layer, f)


def test_dead_features_are_marked(tmp_path, setup):
    x = setup.x.clone()
    x[:, 1, 7] = -1.0  # layer 1, feature 7 never fires
    cache = write_planted_cache(tmp_path / "cache", setup.model_dir, x, setup.tokens, setup.docs)
    out = compute_store(job(setup.root / "clt", tmp_path / "store", cache), progress=False)
    card = FeatureStore(out).card(1, 7)
    assert card.dead and card.count == 0 and card.examples_quantiles[0].examples == []
    assert len(card.top_logits) == 10  # the weight-only parts are there
    assert not FeatureStore(out).card(1, 8).dead


def test_outlier_positions_are_excluded(tmp_path, setup):
    """Positions whose input norm exceeds features.outlier_norm × the layer's mean norm are neither
    counted nor shown."""
    x = setup.x.clone()
    big = torch.arange(3, N, 97)
    x[big, 0, :] = 200.0  # outliers at layer 0 (norm 200·√d ≫ √d)
    cache = write_planted_cache(tmp_path / "cache", setup.model_dir, x, setup.tokens, setup.docs)
    out = compute_store(job(setup.root / "clt", tmp_path / "store", cache, outlier_norm=10.0), progress=False)
    st = FeatureStore(out)
    assert st.manifest["n_tokens"] == N - len(big)
    keep = torch.ones(N, dtype=torch.bool)
    keep[big] = False
    for layer in range(L):
        for f in range(0, D, 3):
            card = st.card(layer, f)
            v = x[:, layer, f].clamp(min=0) * keep
            assert card.count == int((v > 0).sum())
            assert {ex.token_index for g in card.examples_quantiles for ex in g.examples}.isdisjoint(
                big.tolist()
            )


# ---------------------------------------------------------------------------------------------
# Bad input


def test_store_of_another_clt_is_refused(tmp_path, setup):
    other = identity_clt(setup.model_dir)
    with torch.no_grad():
        other.W_enc[0, 0, 0] = 2.0
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(FeatureError, match="another CLT"):
        compute_store(job(tmp_path / "other", setup.store, setup.cache), progress=False)
    with pytest.raises(FeatureError, match="another CLT"):
        FeatureStore(setup.store).check(other)
    FeatureStore(setup.store).check(setup.clt)


def test_cache_of_another_model_is_refused(tmp_path, setup):
    clt = identity_clt("someone/else")
    clt.save_pretrained(tmp_path / "clt")
    from clt.data.activation_cache import CacheError

    with pytest.raises(CacheError, match="subject model"):
        compute_store(
            job(
                tmp_path / "clt",
                tmp_path / "store",
                setup.cache,
            ),
            progress=False,
            subject=SimpleNamespace(tokenizer=None, model=None),
        )
    assert not (tmp_path / "store").exists()


def test_full_disk_mid_write_leaves_nothing(tmp_path, setup, monkeypatch):
    import clt.features.store as store_mod

    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # the second layer file
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    out = tmp_path / "store"
    with pytest.raises(FeatureError, match="disk is full.*nothing was written"):
        compute_store(job(setup.root / "clt", out, setup.cache), progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["store.work"]
    # an earlier store at the same place is left as it was
    monkeypatch.setattr(store_mod.os, "fsync", real_fsync)
    compute_store(job(setup.root / "clt", out, setup.cache), progress=False)
    before = store_records(out)
    calls["n"] = 0
    monkeypatch.setattr(store_mod.os, "fsync", fsync)
    with pytest.raises(FeatureError, match="disk is full"):
        compute_store(job(setup.root / "clt", out, setup.cache, top_k=2), progress=False)
    assert store_records(out) == before


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "clt.features", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, setup):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    for args, pattern in [
        ([str(setup.root / "clt"), "features.tokens=0"], "features.tokens=0 is invalid"),
        ([str(tmp_path / "junk"), f"data.cache={setup.cache}"], "is not a CLT"),
        ([str(tmp_path / "nothing-here")], "is not a CLT"),
    ]:
        r = _cli(*args, "device=cpu")
        assert r.returncode == 2, r.stderr[-2000:]
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and pattern in err[0], r.stderr
        assert not (tmp_path / "junk" / "features").exists()


def test_cli_writes_a_store_and_renders_a_card(tmp_path, setup):
    out = tmp_path / "cli-store"
    r = _cli(
        str(setup.root / "clt"),
        f"features.out={out}",
        f"data.cache={setup.cache}",
        f"data.context_size={PER + 1}",
        f"features.tokens={N}",
        f"features.top_k={TOP_K}",
        f"features.context_left={LEFT}",
        f"features.context_right={RIGHT}",
        "features.stratum_samples=2",
        "features.task=0",
        "features.tasks=1",
        "model.dtype=float32",
        "device=cpu",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tok/s" in r.stderr + r.stdout  # the progress bar
    assert store_records(out) == store_records(setup.store)
    png = tmp_path / "card.png"
    r = _cli("render", str(out), "1", "3", "--out", str(png))
    assert r.returncode == 0, r.stderr
    from PIL import Image

    w, h = Image.open(png).size
    assert w > 1000 and h > 400
    r = _cli("render", str(out), "1", str(D), "--out", str(png))
    assert r.returncode == 2 and "no feature 1/32" in r.stderr
