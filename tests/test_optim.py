"""The optimizer: bf16 decoder moments (stochastic rounding, exact resume), and the resume rule for
configs older than a key."""

import pytest
import torch

from clt.config import ConfigError, TrainConfig, check_resume
from clt.training.optim import Adam, stochastic_round_bf16


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16 (1 + 2⁻⁷)
    r = stochastic_round_bf16(x, g).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(float(r.mean()) - (1.0 + 2**-10)) < 2e-5  # E[round(x)] = x
    y = -x  # negative values: magnitude rounded the same way
    assert abs(float(stochastic_round_bf16(y, g).float().mean()) + (1.0 + 2**-10)) < 2e-5


def test_bf16_moments_track_the_fp32_moments_where_round_to_nearest_stalls():
    """A constant gradient for 3,000 steps: v = 1 − β₂ᵗ. In bf16 with round-to-nearest v stops
    moving once its 10⁻³ steps fall below half a bf16 place; with stochastic rounding it follows."""
    p32, p16 = torch.zeros(4096, requires_grad=True), torch.zeros(4096, requires_grad=True)
    o32 = torch.optim.Adam([p32], lr=1e-3)
    o16 = Adam([{"params": [p16], "moments": "bf16"}], lr=1e-3)
    v_rn = torch.zeros(4096, dtype=torch.bfloat16)
    for _ in range(3000):
        for p, o in ((p32, o32), (p16, o16)):
            p.grad = torch.ones_like(p)
            o.step()
        v_rn = (v_rn.float() * 0.999 + 0.001).to(torch.bfloat16)  # round to nearest
    v32, v16 = o32.state[p32]["exp_avg_sq"], o16.state[p16]["exp_avg_sq"]
    assert v16.dtype == torch.bfloat16 and o16.state[p16]["exp_avg"].dtype == torch.bfloat16
    want = 1 - 0.999**3000
    torch.testing.assert_close(float(v32.mean()), want, rtol=1e-4, atol=0)
    assert abs(float(v16.float().mean()) - want) < 0.005
    assert abs(float(v_rn.float().mean()) - want) > 0.2  # (what plain bf16 would have done)
    torch.testing.assert_close(float(p16.mean()), float(p32.mean()), rtol=2e-3, atol=0)
    torch.testing.assert_close(p16, p32, rtol=0.05, atol=0)  # (each v carries its rounding noise)


def test_fp32_groups_are_torch_adam_exactly_and_bf16_halves_the_state():
    torch.manual_seed(0)
    w = [torch.randn(64, 32) for _ in range(3)]
    a = [t.clone().requires_grad_() for t in w]
    b = [t.clone().requires_grad_() for t in w]
    ref = torch.optim.Adam(a, lr=1e-2, fused=True)
    ours = Adam([{"params": b[:2]}, {"params": b[2:], "moments": "bf16"}], lr=1e-2, fused=True)
    for _ in range(5):
        g = [torch.randn(64, 32) for _ in range(3)]
        for ps in (a, b):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
        ref.step()
        ours.step()
    for x, y in zip(a[:2], b[:2]):
        assert torch.equal(x, y)  # torch's own step for the fp32 groups
    torch.testing.assert_close(b[2], a[2], rtol=0.02, atol=1e-3)
    nbytes = {id(p): sum(t.numel() * t.element_size() for t in ours.state[p].values() if t.dim()) for p in b}
    assert nbytes[id(b[2])] * 2 == nbytes[id(b[0])]


def test_bf16_moments_resume_exactly():
    """10 steps, the state dict saved and loaded into a new optimizer, 10 more = 20 straight."""

    def make():
        torch.manual_seed(0)
        p = torch.randn(300, 7, requires_grad=True)
        return p, Adam([{"params": [p], "moments": "bf16"}], lr=1e-2, seed=3)

    def steps(p, opt, start, n):
        for t in range(start, start + n):
            p.grad = torch.sin(p.detach() * (t + 1))
            opt.step()

    p, opt = make()
    steps(p, opt, 0, 20)
    q, opt_q = make()
    steps(q, opt_q, 0, 10)
    state = opt_q.state_dict()
    q2 = q.detach().clone().requires_grad_()
    opt2 = Adam([{"params": [q2], "moments": "bf16"}], lr=1e-2, seed=3)
    opt2.load_state_dict(state)
    assert opt2.state[q2]["exp_avg_sq"].dtype == torch.bfloat16  # (torch's load would cast to fp32)
    steps(q2, opt2, 10, 10)
    assert torch.equal(p, q2)


def test_an_unknown_moment_dtype_is_refused():
    with pytest.raises(ValueError, match="moments"):
        Adam([{"params": [torch.zeros(1, requires_grad=True)], "moments": "fp8"}])
    cfg = TrainConfig()
    cfg.optim.decoder_moments = "fp8"
    with pytest.raises(ConfigError, match="optim.decoder_moments"):
        cfg.validate()


def test_a_run_older_than_a_key_resumes_with_its_default():
    saved = TrainConfig().to_dict()
    del saved["optim"]["decoder_moments"]  # a run that began before the key existed
    check_resume(saved, TrainConfig().to_dict())
    newer = TrainConfig()
    newer.optim.decoder_moments = "bf16"
    with pytest.raises(ConfigError, match="decoder_moments"):
        check_resume(saved, newer.to_dict())


def test_tf32_only_for_fp32_runs_on_cuda():
    from clt.training.run import float32_matmul_precision

    cfg = TrainConfig()
    cuda, cpu_dev = torch.device("cuda", 0), torch.device("cpu")
    assert float32_matmul_precision(cfg, cuda) == "high"
    assert float32_matmul_precision(cfg, cpu_dev) == "highest"
    cfg.trainer.precision = "bf16-mixed"
    assert float32_matmul_precision(cfg, cuda) == "highest"
    cfg.trainer.precision, cfg.trainer.tf32 = "32-true", False
    assert float32_matmul_precision(cfg, cuda) == "highest"
