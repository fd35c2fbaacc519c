"""Cross-layer TopK and BatchTopK (clt.topk_scope=all): the selection equals a brute-force sort over
all layers' features (with ties and ragged per-layer counts); decode and gradients equal a dense
reference; the inference thresholds keep per layer what the selection kept; training, the eval
form and circuit-tracer's export."""

from __future__ import annotations

import pytest
import torch

from clt import sparsity as act
from clt.model import CLTArchitecture, CrossLayerTranscoder


def brute_topk_all(h: torch.Tensor, k: int) -> torch.Tensor:
    """Per token: sort all L·F values, keep the k·L largest (ReLU'd). h: [N, L, F]."""
    n, L, F = h.shape
    a = torch.zeros_like(h)
    for t in range(n):
        order = sorted(range(L * F), key=lambda i: -float(h[t].reshape(-1)[i]))[: k * L]
        for i in order:
            a[t, i // F, i % F] = max(float(h[t, i // F, i % F]), 0.0)
    return a


def brute_batchtopk_all(h: torch.Tensor, k: int) -> torch.Tensor:
    """Over the whole batch: sort all N·L·F values, keep the k·L·N largest (ReLU'd)."""
    n, L, F = h.shape
    flat = h.reshape(-1).tolist()
    keep = sorted(range(len(flat)), key=lambda i: -flat[i])[: k * L * n]
    a = torch.zeros(len(flat))
    for i in keep:
        a[i] = max(flat[i], 0.0)
    return a.view(n, L, F)


def test_cross_layer_topk_equals_a_brute_force_sort_with_ragged_layers():
    torch.manual_seed(0)
    h = torch.randn(6, 3, 8)
    h[:, 2] += 1.5  # layer 2 wins most of the budget, layer 0 little: ragged per-layer counts
    a, _ = act.topk_all(h, 2)
    torch.testing.assert_close(a, brute_topk_all(h, 2), rtol=0, atol=0)
    counts = (a > 0).sum(-1)  # [N, L]
    assert (counts.sum(-1) == 6).all() and len({tuple(c) for c in counts.tolist()}) > 1
    assert (counts[:, 2] > counts[:, 0]).all()  # the budget follows the pre-activations
    b, _ = act.batchtopk_all(h, 2)
    torch.testing.assert_close(b, brute_batchtopk_all(h, 2), rtol=0, atol=0)
    assert len(set((b > 0).sum((1, 2)).tolist())) > 1  # ragged per token too


def test_cross_layer_selection_with_ties_keeps_exactly_the_budget():
    h = torch.tensor([[[3.0, 1.0, 1.0], [1.0, 2.0, 1.0]]])  # N=1, L=2, F=3, k=1: budget 2
    a, _ = act.topk_all(h, 1)
    kept = a[a > 0]
    assert len(kept) == 2 and sorted(kept.tolist()) == [2.0, 3.0]
    h = torch.tensor([[[2.0, 1.0, 1.0], [1.0, 1.0, 0.5]]])  # budget 2, four tied 1.0s for one slot
    a, _ = act.topk_all(h, 1)
    kept = a[a > 0]
    assert len(kept) == 2 and sorted(kept.tolist()) == [1.0, 2.0]
    unkept = h[a == 0]
    assert unkept.max() <= kept.min()  # every kept value ≥ every value left out
    a, _ = act.batchtopk_all(torch.cat([h, h]), 1)  # N=2: budget 4 over the batch
    assert int((a > 0).sum()) == 4 and a.max() == 2.0


def test_cross_layer_inference_thresholds_keep_per_layer_what_training_kept():
    torch.manual_seed(1)
    h = torch.randn(64, 3, 16) + torch.tensor([0.0, 0.5, 1.0])[None, :, None]
    a, theta = act.topk_all(h, 4)
    kept = (a > 0).sum((0, 2))
    assert torch.equal((act.threshold_relu(h, theta) > 0).sum((0, 2)), kept)
    a, low = act.batchtopk_all(h, 4)
    t = h.reshape(-1).topk(4 * 3 * 64).values[-1]  # one global cut: every layer's smallest kept ≥ it
    assert torch.equal((a > 0), h >= t) and (low >= t).all()
    assert torch.equal((act.threshold_relu(h, low) > 0) | (h == low[None, :, None]), a > 0)


def clt_pair(scope: str, activation: str = "topk"):
    torch.manual_seed(0)
    arch = CLTArchitecture(n_layers=3, d_model=8, d_sae=12, activation=activation, k=2, topk_scope=scope)
    clt = CrossLayerTranscoder(arch, decode="dense")
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.3)
    return clt


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
@pytest.mark.parametrize("decode", ["dense", "sparse"])
def test_cross_layer_decode_and_gradients_equal_the_dense_reference(activation, decode):
    clt = clt_pair("all", activation)
    clt.decode_path = decode
    clt.train()
    x, y = torch.randn(10, 3, 8), torch.randn(10, 3, 8)
    h, a = clt.encode_activate(x, entries=True)
    (clt.decode_normalized(a) - y).pow(2).sum().backward()
    got = [clt.W_enc.grad.clone(), clt.b_enc.grad.clone(), *[w.grad.clone() for w in clt.W_dec]]

    ref = clt_pair("all", activation)  # the same weights: the reference computation by hand
    brute = brute_topk_all if activation == "topk" else brute_batchtopk_all
    hr = torch.einsum("nld,lfd->nlf", x, ref.W_enc) + ref.b_enc
    mask = brute(hr.detach(), 2) > 0
    ar = hr * mask
    yr = torch.stack(
        [sum(ar[:, s] @ ref.W_dec[s][:, t - s] for s in range(t + 1)) + ref.b_dec[t] for t in range(3)], 1
    )
    (yr - y).pow(2).sum().backward()
    want = [ref.W_enc.grad, ref.b_enc.grad, *[w.grad for w in ref.W_dec]]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert not torch.equal(mask, act.topk(hr.detach(), 2) > 0)  # not the per-layer selection


def test_cross_layer_eval_form_is_the_learned_threshold_and_layers_encode_alone():
    clt = clt_pair("all")
    clt.train()
    x = torch.randn(200, 3, 8)
    for _ in range(3):
        clt.encode_activate(x)
        clt.update_batchtopk_threshold(0.5)
    assert (clt.batchtopk_threshold > 0).all()
    clt.eval()
    a = clt.encode_activate(x)[1]
    torch.testing.assert_close(a, act.threshold_relu(clt.encode(x), clt.batchtopk_threshold))
    for layer in range(3):  # one layer alone (splicing, attribution) gives the same activations
        torch.testing.assert_close(clt.encode_layer(x[:, layer], layer), a[:, layer])
    assert abs(float((a > 0).sum(-1).float().mean()) - 2) < 0.5  # about k per layer on average


def test_topk_scope_is_validated_saved_and_exported(tmp_path):
    from clt.config import TrainConfig
    from clt.errors import ConfigError
    from clt.io import export_circuit_tracer, import_circuit_tracer

    cfg = TrainConfig()
    cfg.clt.topk_scope = "global"
    with pytest.raises(ConfigError, match="clt.topk_scope"):
        cfg.validate()
    clt = clt_pair("all")
    clt.batchtopk_threshold.copy_(torch.tensor([0.1, 0.2, 0.3]))
    clt.save_pretrained(tmp_path / "native")
    back = CrossLayerTranscoder.from_pretrained(tmp_path / "native")
    assert back.arch.topk_scope == "all" and torch.equal(back.batchtopk_threshold, clt.batchtopk_threshold)
    export_circuit_tracer(clt, tmp_path / "ct")
    ct = import_circuit_tracer(tmp_path / "ct")
    x = torch.randn(20, 3, 8)
    clt.eval(), ct.eval()
    torch.testing.assert_close(ct.encode_activate(x)[1], clt.encode_activate(x)[1])
    assert "activation: jumprelu" in (tmp_path / "ct" / "config.yaml").read_text()
