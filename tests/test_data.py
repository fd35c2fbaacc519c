"""Text packing, activation batches, the exactly resumable data position, and data errors."""

import json

import pytest
import torch
from conftest import tiny_model

from clt.config import DataConfig
from clt.data import ActivationSource, DataError, TextPosition, WindowStream
from clt.subject import Subject


@pytest.fixture(scope="module")
def subject(tokenizer):
    model = tiny_model("llama", vocab=len(tokenizer), layers=2, d=16)
    return Subject(model, tokenizer)


def small_cfg(**kw):
    base = dict(
        dataset="sotu", context_size=16, batch_windows=4, buffer_tokens=256, eval_docs=2, eval_windows=3
    )
    return DataConfig(**(base | kw))


def test_windows_start_with_bos_and_pack_documents(tokenizer):
    stream = WindowStream(small_cfg(), tokenizer)
    it = stream.windows(TextPosition())
    windows = [next(it)[0] for _ in range(50)]
    assert all(w.shape == (16,) and w[0] == tokenizer.bos_token_id for w in windows)
    flat = torch.cat([w[1:] for w in windows])
    docs = stream._docs(2)  # training starts after the 2 held-out documents
    expected = []
    while len(expected) < len(flat):
        expected += tokenizer(next(docs), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert flat.tolist() == expected[: len(flat)]  # documents packed in order, joined by EOS
    ev = stream.eval_windows()
    assert ev.shape == (3, 16) and (ev[:, 0] == tokenizer.bos_token_id).all()
    assert not any(torch.equal(ev[0], w) for w in windows)  # held-out windows are not trained on


def test_window_stream_resumes_exactly(tokenizer):
    stream = WindowStream(small_cfg(), tokenizer)
    it = stream.windows(TextPosition())
    seq = [next(it) for _ in range(120)]
    pos = seq[59][1]
    it2 = stream.windows(TextPosition.from_dict(json.loads(json.dumps(pos.to_dict()))))
    for w, _ in seq[60:]:
        assert torch.equal(next(it2)[0], w)


def test_batches_drop_bos_and_have_shape(subject, tokenizer):
    src = ActivationSource(subject, small_cfg(), batch_tokens=32, seed=0)
    x, y, pos = next(src.batches())
    assert x.shape == (32, 2, 16) and y.shape == (32, 2, 16)
    windows = torch.stack([next(src.text.windows(TextPosition()))[0]])
    xa, _ = src.activations(windows)
    assert xa.shape[0] == 15  # T − 1: BOS dropped
    xfull, _ = subject.capture(windows)
    torch.testing.assert_close(xa, xfull[0, 1:].float())


def test_batches_resume_from_position(subject):
    src = ActivationSource(subject, small_cfg(), batch_tokens=32, seed=3)
    it = src.batches()
    batches = [next(it) for _ in range(20)]  # crosses block boundaries (256/32 = 8 per block)
    for cut in (3, 7, 8, 13):
        resumed = src.batches(batches[cut][2])  # the position dict, as checkpoints store it
        for x, y, _ in batches[cut + 1 : cut + 6]:
            x2, y2, _ = next(resumed)
            assert torch.equal(x, x2) and torch.equal(y, y2)


def test_buffer_mixes_windows(subject):
    src = ActivationSource(subject, small_cfg(), batch_tokens=32, seed=0)
    x, _, _ = next(src.batches())
    first_windows = src.activations(
        torch.stack([w for w, _ in zip((w for w, _ in src.text.windows(TextPosition())), range(2))])
    )[0]
    # a shuffled batch is not the first 32 tokens in order
    assert not torch.equal(x, first_windows[:32])


def test_empty_corpus_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("")
    stream = WindowStream(small_cfg(dataset=str(tmp_path), eval_docs=0), tokenizer)
    with pytest.raises(DataError, match="yields no training window"):
        next(stream.windows(TextPosition()))


def test_corpus_with_only_held_out_documents(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("one short document")
    stream = WindowStream(small_cfg(dataset=str(tmp_path), eval_docs=1), tokenizer)
    with pytest.raises(DataError, match="held out for evaluation"):
        next(stream.windows(TextPosition()))


def test_missing_text_column_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "d.jsonl").write_text('{"body": "hello there"}\n{"body": "more text"}\n')
    stream = WindowStream(small_cfg(dataset=str(tmp_path / "d.jsonl")), tokenizer)
    with pytest.raises(DataError, match="text column 'text' not found.*body"):
        stream.eval_windows()


def test_local_jsonl_with_column(tmp_path, tokenizer):
    rows = [{"body": "The quick brown fox jumps over the lazy dog. " * 20} for _ in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    stream = WindowStream(
        small_cfg(dataset=str(tmp_path / "d.jsonl"), text_column="body", eval_docs=1), tokenizer
    )
    w, pos = next(stream.windows(TextPosition()))
    assert w[0] == tokenizer.bos_token_id and pos.docs == 1


def test_data_parallel_shards_split_the_training_documents(tmp_path, tokenizer):
    """Two replicas read disjoint documents that together are the whole training stream; the
    held-out documents stay the same; a shard resumes exactly from its own position."""
    docs = [f"document number {i} " + "word " * (5 + i % 7) for i in range(23)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in docs))
    cfg = small_cfg(dataset=str(tmp_path / "c.jsonl"), eval_docs=3, context_size=8)
    full = WindowStream(cfg, tokenizer)
    shards = [WindowStream(cfg, tokenizer, replica=(r, 2)) for r in range(2)]
    assert all(torch.equal(s.eval_windows(), full.eval_windows()) for s in shards)
    seen = [list(s._train_docs(0)) for s in shards]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(docs[3:])
    it = shards[1].windows(TextPosition())
    seq = [next(it) for _ in range(30)]
    again = shards[1].windows(seq[11][1])
    assert all(torch.equal(next(again)[0], w) for w, _ in seq[12:])
    with pytest.raises(DataError, match="replica 2 of 2"):
        WindowStream(cfg, tokenizer, replica=(2, 2))


def test_prefetched_batches_are_the_batches_and_resume(subject):
    """With data.prefetch=on the next block is generated in a background thread: the batches, their
    positions and a resume from a position are the same as without it."""
    plain = ActivationSource(subject, small_cfg(prefetch="off"), batch_tokens=32, seed=3)
    ahead = ActivationSource(subject, small_cfg(prefetch="on"), batch_tokens=32, seed=3)
    assert ahead.prefetch and not plain.prefetch
    it, it2 = plain.batches(), ahead.batches()
    want = [next(it) for _ in range(20)]  # crosses block boundaries (256/32 = 8 per block)
    got = [next(it2) for _ in range(20)]
    for (x, y, p), (x2, y2, p2) in zip(want, got):
        assert torch.equal(x, x2) and torch.equal(y, y2) and p == p2
    resumed = ahead.batches(want[9][2])
    for x, y, _ in want[10:14]:
        x2, y2, _ = next(resumed)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    threads = list(ahead._prefetchers)
    ahead.close()
    for p in threads:
        p._thread.join(timeout=10)
        assert not p._thread.is_alive()


def test_a_failure_in_the_prefetch_thread_reaches_the_trainer(subject):
    from clt.data.stream import Prefetch

    def items():
        yield (torch.zeros(1),)
        raise DataError("the stream broke")

    p = Prefetch(items(), torch.device("cpu"))
    assert torch.equal(next(p)[0], torch.zeros(1))
    with pytest.raises(DataError, match="the stream broke"):
        next(p)


def test_buffer_on_the_subject_device(subject):
    src = ActivationSource(subject, small_cfg(buffer_device="subject", buffer_dtype="bfloat16"), 32)
    x, y, _ = next(src.batches())
    assert x.device == subject.device and x.dtype == torch.bfloat16


def test_buffer_placement_auto(monkeypatch):
    """data.buffer_dtype/buffer_device=auto: a GPU subject keeps its bf16 activations on the GPU when
    the buffers fit an eighth of its memory, else in host memory; a CPU subject: float32 on the CPU."""
    from types import SimpleNamespace

    from clt.data.stream import buffer_placement

    gpu = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, n_layers=30, d_model=576)
    held = 131072 * 2 * 2 * 30 * 576 * 2  # tokens × 2 buffers × (x, y) × L × d × bf16 bytes: 18 GB
    for memory, where in ((80e9, "cpu"), (8 * held, "cuda")):
        props = SimpleNamespace(total_memory=memory)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev, p=props: p)
        dtype, device = buffer_placement(gpu, small_cfg(buffer_tokens=131072), prefetch=True)
        assert dtype == torch.bfloat16 and device.type == where
    cpu_subject = SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16, n_layers=2, d_model=16)
    assert buffer_placement(cpu_subject, small_cfg(), prefetch=False) == (torch.float32, torch.device("cpu"))
    explicit = small_cfg(buffer_dtype="bfloat16", buffer_device="cpu")
    assert buffer_placement(gpu, explicit, prefetch=True) == (torch.bfloat16, torch.device("cpu"))
