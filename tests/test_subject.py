"""Hook points capture what the model computes, for a tiny random model of every family."""

import pytest
import torch
from conftest import tiny_model

from clt.subject import FAMILIES, Subject, SubjectModelError

CASES = [
    ("llama", {}),
    ("qwen2", {}),
    ("gemma2", {}),
    ("gpt2", {}),
    ("gpt_neox", {"use_parallel_residual": False}),
    ("gpt_neox", {"use_parallel_residual": True}),
]


def layer_inputs(subject: Subject, ids):
    """Residual stream entering every layer, and the final hidden state (before the final norm)."""
    seen = []
    handles = [
        layer.register_forward_pre_hook(
            lambda m, args, kw: seen.append(args[0] if args else kw["hidden_states"]), with_kwargs=True
        )
        for layer in subject.layers
    ]
    handles.append(
        subject.layers[-1].register_forward_hook(
            lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
    )
    with torch.no_grad():
        subject.model(input_ids=ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family,kw", CASES)
def test_hooks_capture_model_computation(family, kw):
    model = tiny_model(family, **kw)
    ids = torch.randint(0, 1000, (2, 7))
    resid = layer_inputs(Subject(model), ids)
    mid = Subject(model, input_hook="resid_mid").capture(ids)
    mlp_in = Subject(model, input_hook="mlp_in").capture(ids)
    x, y = mid
    assert x.shape == (2, 7, 3, 32) and y.shape == (2, 7, 3, 32)
    parallel = kw.get("use_parallel_residual", False)
    for l in range(3):
        layer = Subject(model).layers[l]
        # mlp_out is what the MLP block computes from its (normalised) input
        mlp = layer.mlp
        expected = mlp(mlp_in[0][:, :, l])
        if family == "gemma2":
            expected = layer.post_feedforward_layernorm(expected)
        torch.testing.assert_close(y[:, :, l], expected, rtol=1e-5, atol=1e-5)
        if not parallel:
            # the MLP output hook sums with the residual to the next layer's input
            torch.testing.assert_close(x[:, :, l] + y[:, :, l], resid[l + 1], rtol=1e-5, atol=1e-5)
        else:
            # parallel residual: the MLP reads the layer input; next = input + attn + mlp
            torch.testing.assert_close(x[:, :, l], resid[l])
    assert torch.equal(mlp_in[1], y)  # the output hook does not depend on the input choice


def test_capture_stops_before_unembedding():
    model = tiny_model("llama")
    called = []
    model.lm_head.register_forward_hook(lambda *a: called.append(1))
    Subject(model).capture(torch.randint(0, 1000, (1, 4)))
    assert not called


def test_unknown_family_lists_supported():
    model = tiny_model("llama")
    with pytest.raises(SubjectModelError, match="unknown model family 'mamba'.*supported families") as e:
        Subject(model, family="mamba")
    for name in ("llama", "qwen2", "gemma2", "gpt2", "gpt_neox"):
        assert name in str(e.value)
    model.config.model_type = "t5"
    with pytest.raises(SubjectModelError, match="unknown model family 't5'"):
        Subject(model)


def test_missing_hook_lists_available():
    with pytest.raises(SubjectModelError, match="hook 'attn_out' does not exist.*available"):
        Subject(tiny_model("gpt2"), input_hook="attn_out")


def test_all_families_have_all_hooks():
    for fam in FAMILIES.values():
        assert set(fam.hooks) == {"resid_mid", "mlp_in", "mlp_out"}


def test_auto_dtype_is_bf16_only_where_bf16_is_native(monkeypatch):
    import clt.subject as subject_mod

    monkeypatch.setattr(subject_mod, "cpu_has_fast_bf16", lambda: False)
    assert subject_mod.resolve_dtype("auto", "cpu") == torch.float32
    assert subject_mod.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert subject_mod.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    monkeypatch.setattr(subject_mod, "cpu_has_fast_bf16", lambda: True)
    assert subject_mod.resolve_dtype("auto", "cpu") == torch.bfloat16
