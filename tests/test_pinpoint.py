"""Seed 002's pipeline (clt.circuits.pinpoint, clt pinpoint): the residual components, the SVD of each
head's bilinear form, the relative score per singular direction and per component, interventions
that touch one head's query or key only, the task prompt sets, and the pipeline end to end."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from test_circuits import FAMILIES, T, model_of, prompt

from clt.circuits import pinpoint as P
from clt.circuits import tasks
from clt.circuits.command import run_task
from clt.circuits.heads import Heads
from clt.errors import CircuitError


@functools.cache
def trace(family: str):
    model = model_of(family)
    heads = Heads(model)
    return P.Trace(model, heads, prompt()[0]), P.OmegaCache(heads, T)


@pytest.mark.parametrize("family", FAMILIES)
def test_components_sum_to_the_residual_and_terms_to_the_relative_score(family):
    tr, om = trace(family)
    heads = tr.heads
    L = len(heads)
    for m in range(L + 1):
        for p in range(T):
            comp = tr.components(m, p)
            assert len(comp) == len(tr.labels(m))
            assert (comp.sum(0) - tr.resid(m)[p]).abs().max() <= 1e-5 * comp.abs().sum(0).max()
    R = heads.rotations(T)
    for m in range(L):
        S = heads[m].scores(tr.resid_pre[m], R)  # the head's own scores (tested against the model)
        for h in range(heads.n_heads):
            for p, j in [(T - 1, T - 2), (6, 6), (5, 3)]:
                f = P.decompose(tr, om, m, h, p, j)
                keys = P.visible_keys(heads, m, p, T)
                r = S[h, p, j] - S[h, p, [k for k in keys if k != j]].mean()
                scale = float(S[h, p, keys].abs().sum() + f.terms.abs().sum())
                assert abs(f.relative - float(r)) <= 1e-5 * scale
                assert abs(float(f.terms.sum()) + f.bias - f.relative) <= 1e-6 * scale
                f.selected = list(range(len(f.terms)))  # every direction: the shares add up to Σ t_k
                _, Cq, _, Ck = P.contributions(tr, om, f)
                total = float(f.terms.sum())
                assert abs(float(Cq.sum()) - total) <= 1e-5 * (float(Cq.abs().sum()) + 1e-9)
                assert abs(float(Ck.sum()) - total) <= 1e-5 * (float(Ck.abs().sum()) + 1e-9)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "gpt_neox"])
def test_omega_svd_is_exact_orthonormal_and_sorted(family):
    tr, om = trace(family)
    heads = tr.heads
    R = heads.rotations(T)
    lh = heads[1]
    for delta in (0, 3):
        o = om(1, 2, delta)
        Rd = torch.eye(heads.head_dim) if R is None else R[delta]
        Omega = lh.Wq(2).T @ Rd.T @ lh.Wk(2)
        rebuilt = o.U @ torch.diag(o.S) @ o.V.T
        assert (rebuilt - Omega).abs().max() <= 1e-5 * Omega.abs().max()
        eye = torch.eye(len(o.S))
        torch.testing.assert_close(o.U.T @ o.U, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(o.V.T @ o.V, eye, atol=1e-5, rtol=0)
        assert (o.S >= 0).all() and (o.S[:-1] >= o.S[1:]).all()
        torch.testing.assert_close(o.S, torch.linalg.svdvals(Omega)[: len(o.S)], rtol=1e-4, atol=1e-6)


def test_the_selected_directions_carry_the_sum():
    tr, om = trace("llama")
    for h in range(4):
        f = P.decompose(tr, om, 2, h, T - 1, 4)
        total = float(f.terms.sum())
        if total <= 0:
            assert f.selected == []
            continue
        assert round(float(f.terms[f.selected].sum()), 5) >= round(total, 5)
        assert sorted(f.terms[f.selected].tolist(), reverse=True) == f.terms[f.selected].tolist()


def test_an_intervention_touches_one_heads_query_only():
    tr, om = trace("llama")
    tp = tasks.TaskPrompt("", [5], [6], {})
    base = P.patched_logit_diffs(tr, tp, [[]])[0]
    clean = float(tr.logits[-1, 5] - tr.logits[-1, 6])
    assert base == pytest.approx(clean, abs=1e-5)
    m, h, p = 2, 1, 7
    vec = tr.components(m, p)[1] * tr.s_pre[m][p]  # MLP 0 at p
    basis = om(m, h, 0).U[:, :2]
    delta = P.signal_delta(tr, m, h, p, "d", vec, basis)
    # the query of head h at p moves by exactly −R_p Wq (P_U x̃_c): read the patterns back
    captured = {}
    orig = P._patched_attention

    def spy(module, query, key, value, mask, **kw):
        out, w = orig(module, query, key, value, mask, **kw)
        captured.setdefault(id(module), []).append(w.detach())
        return out, w

    P._PATCHES.append({})
    try:
        P._patched_attention = spy
        P._register()
        P.patched_logit_diffs(tr, tp, [[], [(m, h, p, "d", 1e3 * delta)]])  # (large: visible in A)
    finally:
        P._patched_attention = orig
        P._register()
        P._PATCHES.pop()
    w = captured[id(tr.heads.attn_modules[m])][0]  # [2, H, T, T]: batch 0 clean, 1 patched
    changed = w[1] != w[0]
    assert changed[h, p].any() and changed.sum() == changed[h, p].sum()  # only that head's row p
    for earlier in range(m):
        we = captured[id(tr.heads.attn_modules[earlier])][0]
        assert (we[1] == we[0]).all()
    R = tr.heads.rotations(T)
    lh = tr.heads[m]
    want = R[p] @ (lh.Wq(h) @ (basis @ (basis.T @ vec)))
    torch.testing.assert_close(delta, want)


def test_task_prompts_point_at_their_roles(tokenizer):
    ps = tasks.ioi(tokenizer, 20)
    for tp in ps:
        ids = tasks._ids(tokenizer, tp.text, tasks._bos(tokenizer))
        assert (
            ids[tp.roles["IO"]] == tp.correct[0] and ids[tp.roles["S1"]] == ids[tp.roles["S2"]] == tp.wrong[0]
        )
        assert tp.roles["S1"] < tp.roles["S2"] < tp.roles["END"] == len(ids) - 1
    assert {tp.roles["IO"] < tp.roles["S1"] for tp in ps} == {True, False}  # both ABBA and BABA
    gp = tasks.gendered_pronoun(tokenizer)
    assert len(gp) == 100 and len({tp.text for tp in gp}) == 100
    assert all(len(tp.correct) == len(tp.wrong) == 1 for tp in gp)
    with pytest.raises(CircuitError, match="no valid years"):
        tasks.greater_than(tokenizer, 5)
    digits = tasks.greater_than_digits(tokenizer, 10)
    for tp in digits:
        ids = tasks._ids(tokenizer, tp.text, tasks._bos(tokenizer))
        tens = int(tokenizer.decode([ids[tp.roles["YY"]]]))
        assert tp.correct == [tasks._one_token(tokenizer, str(i)) for i in range(tens + 1, 10)]
        assert tp.text.endswith(tokenizer.decode(ids[-2:]).strip())
    with pytest.raises(CircuitError, match="is 2 tokens, not one"):
        tasks.custom(tokenizer, "The capital of France is", " Parisville", " London")
    with pytest.raises(CircuitError, match="unknown task"):
        tasks.prompts("nope", tokenizer, 1)


class PairDigits:
    """A stand-in tokenizer with GPT-2's year split (' 1732' -> ' 17', '32'): words with their
    leading space, then digits two at a time."""

    bos_token_id, eos_token_id = 0, 0

    def __init__(self):
        self.vocab: dict[str, int] = {"<bos>": 0}

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, len(self.vocab))

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        pieces = []
        for word in re.findall(r" ?[^\s\d]+| ?\d+", text):
            if word.strip().isdigit():
                lead = " " if word.startswith(" ") else ""
                d = word.strip()
                pieces += [lead + d[:2], *[d[i : i + 2] for i in range(2, len(d), 2)]]
            else:
                pieces.append(word)
        return {"input_ids": [self._id(p) for p in pieces]}


def test_greater_than_with_whole_two_digit_tokens():
    tok = PairDigits()
    ps = tasks.greater_than(tok, 12)
    for tp in ps:
        ids = tasks._ids(tok, tp.text, 0)
        yy = int(tp.text.split("year ")[1][2:4])
        assert ids[tp.roles["YY"]] == tasks._one_token(tok, f"{yy:02d}")
        assert len(tp.correct) == 99 - yy and len(tp.wrong) == yy + 1


def test_the_pipeline_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clt.cli import main

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    res = run_task(
        model, tok, "ioi", n_prompts=6, threshold=0.0, min_prompts=1, max_firings=20, progress=False
    )
    c = res["circuit"]
    assert c.edges and any(t == "root" for _, _, t in c.edges)
    nodes = c.nodes()
    assert ("LD",) in nodes
    for e in c.edges:  # kept edges: a root edge or one whose intervention effect was measured
        assert e[2] == "root" or e in c.effect
    cy = P.cytoscape(c, 3)
    ids = {n["data"]["id"] for n in cy["elements"]["nodes"]}
    assert all(e["data"]["source"] in ids and e["data"]["target"] in ids for e in cy["elements"]["edges"])
    assert set(res["effect"]) == {"clean", "ablated", "control", "removed", "removed_control"}
    out = tmp_path / "circ"
    assert (
        main(["pinpoint", str(tiny_model_dir), "--prompts", "4", "--max-firings", "10", "--out", str(out)])
        == 0
    )
    for name in ("circuit.cyjs", "circuit.json", "circuit.png", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["task"] == "ioi"
    assert "logit difference: clean" in capsys.readouterr().out
    assert (
        main(["pinpoint", "bundled:smollm2-135m-instruct", "--task", "gt", "--out", str(tmp_path / "gt")])
        == 2
    )
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "it/s]" not in x]  # (load bars)
    assert len(err) == 1 and "no valid years" in err[0] and not (tmp_path / "gt").exists()


@pytest.mark.slow
def test_ioi_on_smollm2_the_circuit_carries_the_logit_difference():
    from clt.config import ModelConfig
    from clt.subject import load_subject

    sub = load_subject(ModelConfig(dtype="float32"))
    res = run_task(sub.model, sub.tokenizer, "ioi", n_prompts=4, progress=False)
    eff = res["effect"]
    assert eff["clean"] > 1.0 and eff["removed"] > 0.5 and abs(eff["removed_control"]) < 0.2
