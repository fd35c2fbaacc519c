"""BERT as a subject (the `bert` family, a masked LM): on tiny random BertForMaskedLM models built
from a config, the hooks read and write the feed-forward block (mlp_out = FFN(mlp_in)), the
post-LayerNorm residual identities hold, BERT's 80/10/10 masking is what it says, loading picks the
masked-LM model, and an encoder-decoder or a BERT without its MLM head is a clear error."""

from __future__ import annotations

import pytest
import torch

from clt.config import ModelConfig
from clt.subject import Subject, SubjectModelError, load_subject, mlm_mask


def tiny_bert(seed: int = 0, layers: int = 3):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.BertConfig(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return tf.BertForMaskedLM(cfg).eval()


def bert_tokenizer():
    """A tiny WordPiece tokenizer (letters, digits, punctuation, a few words), built offline."""
    from transformers import BertTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()")
    words = ["the", "of", "and", "to", "in", "a", "is", "that", "we", "our", "will", "america"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars], *words]
    return BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)


def test_bert_hooks_read_and_write_the_feed_forward_block(tmp_path):
    model = tiny_bert()
    sub = Subject(model, bert_tokenizer(), input_hook="resid_mid", output_hook="mlp_out")
    assert sub.masked_lm and sub.n_layers == 3 and sub.d_model == 32
    ids = torch.randint(5, 100, (2, 24))
    x, y = sub.capture(ids)  # [B, T, L, d], of the masked windows (as BERT trains)
    masked = sub.mask(ids)[0]
    assert (masked == 4).any()
    outs: list = []
    handles = [
        layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for layer in model.bert.encoder.layer
    ]
    with torch.no_grad():
        model(input_ids=masked)
    for h in handles:
        h.remove()
    for layer, block in enumerate(model.bert.encoder.layer):
        with torch.no_grad():
            ffn = block.output.dense(block.intermediate(x[:, :, layer]))  # FFN(mlp_in)
            torch.testing.assert_close(y[:, :, layer], ffn, rtol=1e-5, atol=1e-6)
            # post-LN: the layer's output is LayerNorm(mlp_out + resid_mid)
            post = block.output.LayerNorm(y[:, :, layer] + x[:, :, layer])
            torch.testing.assert_close(outs[layer], post, rtol=1e-5, atol=1e-6)
            if layer + 1 < 3:  # the next layer's resid_mid: LayerNorm(attention(out) + out)
                nxt = model.bert.encoder.layer[layer + 1].attention(post)[0]
                torch.testing.assert_close(x[:, :, layer + 1], nxt, rtol=1e-5, atol=1e-6)
    x2, _ = Subject(model, sub.tokenizer, input_hook="mlp_in").capture(ids)
    torch.testing.assert_close(x2, x)  # post-LN: resid_mid and mlp_in are one tensor


def test_replacing_mlp_out_changes_the_mlm_logits_exactly_like_the_ffn(tmp_path):
    model = tiny_bert()
    sub = Subject(model, bert_tokenizer())
    ids = torch.randint(5, 100, (1, 10))
    with torch.no_grad():
        x, y = sub.capture(ids)
        ids = sub.mask(ids)[0]  # what capture ran on
        clean = model(input_ids=ids).logits
        with sub.hooks({"mlp_out": lambda layer, t: y[:, :, layer].clone()}):
            same = model(input_ids=ids).logits
        with sub.hooks({"mlp_out": lambda layer, t: torch.zeros_like(t)}):
            ablated = model(input_ids=ids).logits
    torch.testing.assert_close(same, clean)
    assert (ablated - clean).abs().max() > 1e-3  # (random BERT weights are small: std 0.02)


def test_mlm_mask_is_80_10_10_deterministic_and_spares_special_tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 128), generator=g)
    ids[:, 0] = 1  # [CLS]-like special token
    out, chosen = mlm_mask(ids, mask_id=3, vocab=1000, special=[1, 3])
    assert torch.equal(out, mlm_mask(ids, mask_id=3, vocab=1000, special=[1, 3])[0])  # deterministic
    assert abs(chosen[:, 1:].float().mean() - 0.15) < 0.01 and not chosen[:, 0].any()
    assert ((out != ids) <= chosen).all()
    assert torch.equal(out[:, 0], ids[:, 0])
    n = ids[:, 1:].numel()
    masked = (out == 3).sum().item()
    changed = ((out != ids) & (out != 3)).sum().item()
    # 15% chosen: 80% [MASK] (12% of positions), 10% random (1.5%, a few land on the same token)
    assert abs(masked / n - 0.12) < 0.01
    assert abs(changed / n - 0.015) < 0.004
    assert not torch.equal(mlm_mask(ids.flip(0), 3, 1000, [1, 3])[0].flip(0), out)  # depends on content


def test_loading_picks_the_masked_lm_and_refuses_what_it_cannot_read(tmp_path):
    import transformers as tf

    model = tiny_bert()
    model.save_pretrained(tmp_path / "bert")
    bert_tokenizer().save_pretrained(tmp_path / "bert")
    sub = load_subject(ModelConfig(name_or_path=str(tmp_path / "bert"), dtype="float32"))
    assert isinstance(sub.model, tf.BertForMaskedLM) and sub.masked_lm
    model.bert.save_pretrained(tmp_path / "bare")  # a BertModel: no MLM head
    with pytest.raises(SubjectModelError, match="no masked-LM head"):
        load_subject(ModelConfig(name_or_path=str(tmp_path / "bare"), dtype="float32"))
    t5 = tf.T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    tf.T5ForConditionalGeneration(t5).save_pretrained(tmp_path / "t5")
    with pytest.raises(SubjectModelError, match="encoder-decoder"):
        load_subject(ModelConfig(name_or_path=str(tmp_path / "t5"), dtype="float32"))


def test_heads_refuse_bert_clearly():
    from clt.circuits.heads import Heads
    from clt.errors import CircuitError

    with pytest.raises(CircuitError, match="bidirectional"):
        Heads(tiny_bert())


def test_train_py_trains_a_clt_on_bert_with_masked_windows_and_reports_the_mlm_ce(tmp_path):
    import json

    from conftest import tiny_overrides, train_cli

    model_dir = tmp_path / "bert"
    tiny_bert().save_pretrained(model_dir)
    bert_tokenizer().save_pretrained(model_dir)
    r = train_cli(tiny_overrides(model_dir, tmp_path / "run", report=True, **{"trainer.max_steps": 10}))
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    # the MLM CE of the clean model at the masked positions: a random BERT is near uniform (ln V)
    assert abs(rep["eval/ce_loss_clean"] - torch.log(torch.tensor(300.0)).item()) < 0.5
    assert rep["eval/ce_loss_spliced"] > 0 and len(rep["fvu_per_layer"]) == 3


# ---------------------------------------------------------------------------------------------
# The replacement model and attribution graphs at a [MASK] position


def bert_case(trained: bool = False):
    from test_attribution import make_clt

    from clt.attribution import ReplacementModel

    sub = Subject(tiny_bert(), bert_tokenizer())
    clt = make_clt(sub, "topk")
    if trained:  # a few Adam steps on the tiny BERT's activations of random (masked) windows
        ids = torch.randint(5, 100, (8, 24), generator=torch.Generator().manual_seed(1))
        ids[:, 0] = sub.tokenizer.cls_token_id
        x, y = (t[:, 1:].reshape(-1, *t.shape[2:]).float() for t in sub.capture(ids))
        opt = torch.optim.Adam(clt.parameters(), lr=3e-3)
        for _ in range(40):
            loss = (clt(x)[1] - y).pow(2).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        clt.eval()
    rm = ReplacementModel(sub, clt)
    tok = sub.tokenizer
    ids = torch.tensor([tok.cls_token_id, *range(20, 26), tok.mask_token_id, 30, tok.sep_token_id])
    return rm, ids


def test_bert_replacement_model_reproduces_the_mlm_logits():
    rm, ids = bert_case(trained=True)
    with torch.no_grad():
        clean = rm.model(input_ids=ids[None]).logits[0]
    ctx = rm.prepare(ids)
    assert ctx.target == 7  # the [MASK]
    torch.testing.assert_close(ctx.logits, clean, rtol=1e-5, atol=1e-5)
    _, pre = rm.frozen_forward(ctx)  # every source clean, errors included: the model itself
    torch.testing.assert_close(pre, clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm.forward(ids, errors=True), clean, rtol=1e-5, atol=1e-5)
    assert (rm.forward(ids, errors=False) - clean).abs().max() > 1e-4  # the CLT alone differs


@pytest.mark.parametrize("trained", [False, True], ids=["random", "trained"])
def test_bert_attribution_edges_are_faithful_to_perturbation(trained):
    from test_attribution import perturbed

    from clt.attribution import attribute

    rm, ids = bert_case(trained)
    graph = attribute(ids, rm.clt, rm, batch_size=16, verbose=False)
    assert graph.info["target_position"] == 7 and graph.n_features > 0
    ctx = rm.prepare(ids)
    T = len(ids)

    def targets(h, logits):
        f = graph.active_features[graph.selected_features]
        z = logits[ctx.target]
        return torch.cat([h[f[:, 1], f[:, 0], f[:, 2]], z[graph.logit_tokens] - z.mean()])

    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_slice.start, graph.n_nodes)])
    A = graph.adjacency_matrix[rows]
    base = targets(*rm.frozen_forward(ctx))
    torch.testing.assert_close(base, graph.node_values[rows], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        A.sum(1) + graph.node_bias[rows],
        graph.node_values[rows],
        rtol=1e-4,
        atol=1e-4 * base.abs().max().item(),
    )
    delta, worst, big = 4.0, 0.0, 0
    sources = [("feature", i) for i in range(graph.n_features)]
    sources += [("error", (layer, p)) for layer in range(rm.n_layers) for p in range(1, T)]
    sources += [("token", p) for p in range(T)]
    for kind, s in sources:  # every edge into every target
        E, a, err, col = perturbed(ctx, graph, kind, s, delta)
        change = targets(*rm.frozen_forward(ctx, E, a, err)) - base
        expected = A[:, col] * delta
        scale = expected.abs().max().item()
        assert (change - expected).abs().max().item() <= 1e-4 * scale + 1e-6, (kind, s)
        # relative error where the change is far above the fp32 rounding of the O(1) post-LayerNorm
        # targets it is a difference of (≈1e-7: at scale 1e-3 that alone is 1e-4)
        if scale > 1e-2:
            worst = max(worst, (change - expected).abs().max().item() / scale)
            big += 1
    assert worst <= 1e-4 and big > 20, (worst, big)
    # edges from later positions exist: BERT is bidirectional
    later = graph.token_slice.start + ctx.target + 1
    assert A[-1, later].abs() > 0
    from clt.attribution import prune, to_json

    nodes = to_json(graph, prune(graph), "bert", 0.8)["nodes"]
    assert {n["ctx_idx"] for n in nodes if n["feature_type"] == "logit"} == {7}  # drawn at the [MASK]


def test_a_bert_prompt_needs_exactly_one_mask():
    from clt.attribution import AttributionError

    rm, ids = bert_case()
    with pytest.raises(AttributionError, match="exactly one"):
        rm.prepare(ids[ids != rm.subject.tokenizer.mask_token_id])
    with pytest.raises(AttributionError, match="has 2"):
        rm.prepare(torch.cat([ids[:3], ids[7:8], ids[3:]]))
