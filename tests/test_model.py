"""The CLT: decode against an explicit double loop, sparse vs dense decode, per-layer splice API,
normalisation folding, native save/load and its errors."""

import json

import pytest
import torch

from clt.kernels import cpu
from clt.kernels.reference import decode_dense, decode_padded, decode_sparse, to_padded
from clt.model import CheckpointError, CLTArchitecture, CrossLayerTranscoder


def make_clt(activation="topk", L=4, d=6, F=10, k=3, seed=0, **kw):
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(
        CLTArchitecture(n_layers=L, d_model=d, d_sae=F, activation=activation, k=k, **kw)
    )
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.1)
        clt.b_dec.normal_()
        clt.input_scale.uniform_(0.5, 2.0)
        clt.output_scale.uniform_(0.5, 2.0)
    return clt


def double_loop_decode(a, W_dec):
    n, L, _ = a.shape
    out = torch.zeros(n, L, W_dec[0].shape[-1], dtype=a.dtype)
    for s in range(L):
        for t in range(s, L):
            out[:, t] += a[:, s] @ W_dec[s][:, t - s]
    return out


@pytest.mark.parametrize("L", [1, 4])
def test_decode_equals_double_loop(L):
    torch.manual_seed(0)
    a = torch.randn(7, L, 10).relu()
    W = [torch.randn(10, L - s, 6) for s in range(L)]
    ref = double_loop_decode(a, W)
    torch.testing.assert_close(decode_dense(a, W), ref)
    torch.testing.assert_close(decode_sparse(a, W), ref)
    torch.testing.assert_close(decode_padded(*to_padded(a), W), ref)


def test_to_padded_format():
    a = torch.tensor([[[0.0, 2.0, 0.0, 3.0]], [[0.0, 0.0, 0.0, 0.0]], [[1.0, 0.0, 0.0, 0.0]]])
    idx, val = to_padded(a)
    assert idx.tolist() == [[[1, 3]], [[-1, -1]], [[0, -1]]]
    assert val.tolist() == [[[2.0, 3.0]], [[0.0, 0.0]], [[1.0, 0.0]]]
    support = torch.zeros(3, 1, 4, dtype=torch.bool)
    support[1, 0, 2] = True  # an inactive position that needs gradient
    idx, val = to_padded(a, support | (a != 0))
    assert idx[1].tolist() == [[2, -1]] and val[1].tolist() == [[0.0, 0.0]]


def test_decode_gradients_match_double_loop():
    """Sparse and dense decode (which share the shifted-sum autograd Function) against the
    explicit double loop differentiated by autograd."""
    torch.manual_seed(0)
    L = 3
    a0 = torch.randn(9, L, 11)
    a0[a0 < 0.8] = 0  # sparse, ragged per token
    a0[0] = 0  # a token with no active feature
    a0[:, :, 2] = 1.5  # a feature active on every token
    W0 = [torch.randn(11, L - s, 5) for s in range(L)]
    g = torch.randn(9, L, 5)
    grads = []
    for fn in (double_loop_decode, decode_dense, decode_sparse):
        a = a0.clone().requires_grad_(True)
        W = [w.clone().requires_grad_(True) for w in W0]
        (fn(a, W) * g).sum().backward()
        grads.append((a.grad * (a0 != 0), [w.grad for w in W]))  # a's gradient matters where active
    for other in grads[1:]:
        torch.testing.assert_close(other[0], grads[0][0])
        for g_ref, g in zip(grads[0][1], other[1]):
            torch.testing.assert_close(g, g_ref)


@pytest.fixture(params=["kernel", "torch"])
def sparse_path(request, monkeypatch):
    """Each implementation of the sparse decode's loops: the C kernel (kernels.cpu) and the
    embedding_bag one it falls back to."""
    if request.param == "kernel":
        assert cpu.library() is not None, "the CPU decode kernel did not build (is a C compiler on PATH?)"
    else:
        monkeypatch.setattr(cpu, "usable", lambda *tensors: False)
    return request.param


@pytest.mark.parametrize("d", [7, 40])
@pytest.mark.parametrize("wants", ["both", "a", "W"])
def test_tiled_sparse_decode_gradients_on_a_support(wants, d, sparse_path):
    """The slab-at-a-time sparse decode (decode_sparse): ∂a on a support wider than the active set
    (JumpReLU's band: inactive positions get their dense gradient), a source layer with no entry,
    and each input alone requiring gradient; against autograd through the double loop. d = 7 is
    all vector tail in the kernel, d = 40 two 16-wide vectors and a tail."""
    torch.manual_seed(1)
    L, F = 4, 13
    a0 = torch.randn(10, L, F)
    a0[a0 < 1.0] = 0
    a0[:, 2] = 0  # source layer 2: nothing active and nothing on the support
    support = (a0 != 0) | (torch.rand(a0.shape) < 0.1)
    support[:, 2] = False
    W0 = [torch.randn(F, L - s, d) for s in range(L)]
    g = torch.randn(10, L, d)
    out = []
    for fn in (double_loop_decode, lambda a, W: decode_sparse(a, W, support)):
        a = a0.clone().requires_grad_(wants in ("both", "a"))
        W = [w.clone().requires_grad_(wants in ("both", "W")) for w in W0]
        y = fn(a, W)
        (y * g).sum().backward()
        out.append((y.detach(), None if a.grad is None else a.grad * support, [w.grad for w in W]))
    torch.testing.assert_close(out[1][0], out[0][0])
    if wants != "W":
        torch.testing.assert_close(out[1][1], out[0][1])
    else:
        assert out[1][1] is None
    for ref, got in zip(out[0][2], out[1][2]):
        if wants == "a":
            assert got is None
        else:
            torch.testing.assert_close(got, ref)


def test_cpu_kernel_panels_and_threads():
    """The C kernel with more tokens than one panel holds (its columns then run in several panels
    of 16, the last one short) against the double loop, and the same output and W_dec gradient
    bit for bit on 1 and 2 threads (each call owns whole target layers)."""
    assert cpu.library() is not None
    torch.manual_seed(2)
    n, L, F, d = 24_000, 3, 9, 40
    assert cpu.library().clt_panel_width(F, n, d) == 16
    a0 = torch.randn(n, L, F)
    a0[a0 < 1.5] = 0
    W0 = [torch.randn(F, L - s, d) for s in range(L)]
    g = torch.randn(n, L, d)
    results = []
    for threads in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            W = [w.clone().requires_grad_(True) for w in W0]
            y = decode_sparse(a0, W)
            (y * g).sum().backward()
        finally:
            torch.set_num_threads(old)
        results.append((y.detach(), [w.grad for w in W]))
    # float64 reference: a W_dec gradient sums ~1,600 terms of size ~2 with cancellation, so fp32
    # rounding alone is ~1e-4 absolute
    W = [w.double().requires_grad_(True) for w in W0]
    y_ref = double_loop_decode(a0.double(), W)
    (y_ref * g.double()).sum().backward()
    torch.testing.assert_close(results[0][0].double(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    for got, ref in zip(results[0][1], W):
        torch.testing.assert_close(got.double(), ref.grad, rtol=1e-5, atol=5e-4)
    assert torch.equal(results[0][0], results[1][0])
    for one, two in zip(results[0][1], results[1][1]):
        assert torch.equal(one, two)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
def test_forward_matches_explicit_math(activation):
    clt = make_clt(activation).eval()
    x = torch.randn(5, 4, 6)
    a, y = clt(x)
    h = torch.einsum("nld,lfd->nlf", x * clt.input_scale[:, None], clt.W_enc) + clt.b_enc
    torch.testing.assert_close(clt.encode(x), h)
    expected = (double_loop_decode(a, list(clt.W_dec)) + clt.b_dec) / clt.output_scale[:, None]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
def test_layerwise_api_matches_batched(activation):
    clt = make_clt(activation).eval()
    with torch.no_grad():
        clt.batchtopk_threshold.fill_(0.1)
    x = torch.randn(5, 4, 6)
    a, y = clt(x)
    acts = [clt.encode_layer(x[:, l], l) for l in range(4)]
    torch.testing.assert_close(torch.stack(acts, 1), a)
    for l in range(4):
        torch.testing.assert_close(clt.decode_layer(acts, l), y[:, l], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
def test_layer_entries_are_the_nonzeros_of_the_layer(activation):
    """encode_layer_entries (TopK: from its own selection) lists exactly the non-zeros of
    encode_layer, each once; `out` receives the same activations."""
    clt = make_clt(activation).eval()
    with torch.no_grad():
        clt.batchtopk_threshold.fill_(0.1)
    x = torch.randn(7, 4, 6)
    for layer in range(4):
        a = clt.encode_layer(x[:, layer], layer)
        out = torch.full_like(a, float("nan"))
        got, (t, f, v) = clt.encode_layer_entries(x[:, layer], layer, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, a)
        order = torch.argsort(t * a.shape[1] + f)
        t, f, v = t[order], f[order], v[order]
        want_t, want_f = (a > 0).nonzero(as_tuple=True)
        assert torch.equal(t, want_t) and torch.equal(f, want_f) and torch.equal(v, a[want_t, want_f])


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_normalisation_folds_exactly(tmp_path, activation):
    clt = make_clt(activation, log_threshold=activation == "jumprelu").eval()
    x = torch.randn(8, 4, 6)
    a, y = clt(x)
    folded = clt.folded()
    assert torch.all(folded.input_scale == 1) and torch.all(folded.output_scale == 1)
    folded.save_pretrained(tmp_path / "export")
    reloaded = CrossLayerTranscoder.from_pretrained(tmp_path / "export").eval()
    a2, y2 = reloaded(x)
    torch.testing.assert_close(a2, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-6)


def test_save_load_roundtrip_identical(tmp_path):
    clt = make_clt("jumprelu")
    clt.save_pretrained(tmp_path / "c", summary={"fvu": 0.5})
    back = CrossLayerTranscoder.from_pretrained(tmp_path / "c")
    for (k, v), (k2, v2) in zip(clt.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["summary"]["fvu"] == 0.5 and cfg["architecture"]["activation"] == "jumprelu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp leftovers


def test_unreadable_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a CLT checkpoint"):
        CrossLayerTranscoder.from_pretrained(tmp_path)
    clt = make_clt()
    clt.save_pretrained(tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="unreadable CLT weights"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable CLT config"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "c")


def test_weights_that_do_not_match_config(tmp_path):
    make_clt(F=10).save_pretrained(tmp_path / "c")
    cfg_path = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architecture"]["d_sae"] = 12
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        CrossLayerTranscoder.from_pretrained(tmp_path / "c")


def test_batchtopk_inference_threshold_tracks_min_kept():
    clt = make_clt("batchtopk").train()
    x = torch.randn(16, 4, 6)
    a = clt.activate(clt.encode(x))
    min_kept = torch.stack([a[:, l][a[:, l] > 0].min() for l in range(4)])
    clt.update_batchtopk_threshold(0.9)
    torch.testing.assert_close(clt.batchtopk_threshold, min_kept)  # first update takes the value
    clt.activate(clt.encode(x))
    clt.update_batchtopk_threshold(0.9)
    torch.testing.assert_close(clt.batchtopk_threshold, min_kept)  # EMA of equal values


@pytest.mark.parametrize("density", [0.05, 0.5])
def test_encoder_weight_gradient_from_the_nonzero_dh(density):
    """encoder_matmul: h = x W_encᵀ per layer, W_enc's gradient summed over the non-zero ∂h only
    (the C kernel, at ≤ 10% non-zero) or by the dense GEMM (above), and x's gradient; against
    autograd through einsum."""
    assert cpu.library() is not None
    from clt.kernels.reference import encoder_matmul

    torch.manual_seed(4)
    x0, W0 = torch.randn(40, 3, 20), torch.randn(3, 24, 20)
    g = torch.randn(40, 3, 24) * (torch.rand(40, 3, 24) < density)
    grads = []
    for fn in (encoder_matmul, lambda x, W: torch.einsum("nld,lfd->nlf", x, W)):
        x, W = x0.clone().requires_grad_(True), W0.clone().requires_grad_(True)
        h = fn(x, W)
        (h * g).sum().backward()
        grads.append((h.detach(), x.grad, W.grad))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
