"""Each activation against a hand-computed example; JumpReLU's pseudo-gradients against the
formulas of docs/DESIGN.md §1; gradcheck in fp64 where the function is smooth."""

import pytest
import torch

from clt import sparsity as act


def test_topk_hand_example():
    h = torch.tensor([[[3.0, -1.0, 2.0, 0.5]], [[-2.0, -3.0, -1.0, -4.0]]])  # [N=2, L=1, F=4]
    a = act.topk(h, 2)
    assert torch.equal(a, torch.tensor([[[3.0, 0.0, 2.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]]]))  # ReLU'd


def test_batchtopk_hand_example():
    # per layer the k·N = 2·2 = 4 largest over the batch; token 0 gets 3, token 1 gets 1
    h = torch.tensor([[[5.0, 4.0, 3.0, -1.0]], [[2.0, 0.1, 0.2, 0.3]]])
    a, min_kept = act.batchtopk(h, 2)
    assert torch.equal(a, torch.tensor([[[5.0, 4.0, 3.0, 0.0]], [[2.0, 0.0, 0.0, 0.0]]]))
    assert min_kept.tolist() == [2.0]


def test_batchtopk_is_per_layer():
    h = torch.tensor([[[1.0, 2.0], [10.0, 20.0]]])  # N=1, L=2, F=2, k=1
    a, min_kept = act.batchtopk(h, 1)
    assert torch.equal(a, torch.tensor([[[0.0, 2.0], [0.0, 20.0]]]))
    assert min_kept.tolist() == [2.0, 20.0]


def test_threshold_relu_hand_example():
    h = torch.tensor([[[0.5, 1.5], [2.5, 3.5]]])
    a = act.threshold_relu(h, torch.tensor([1.0, 3.0]))
    assert torch.equal(a, torch.tensor([[[0.0, 1.5], [0.0, 3.5]]]))


def test_jumprelu_forward_hand_example():
    h = torch.tensor([[0.05, 0.2, -1.0, 1.0]])
    theta = torch.tensor([0.1, 0.1, 0.1, 2.0])
    assert torch.equal(act.jumprelu(h, theta), torch.tensor([[0.0, 0.2, 0.0, 0.0]]))


def test_relu_hand_example():
    from clt.model import CLTArchitecture, CrossLayerTranscoder

    clt = CrossLayerTranscoder(CLTArchitecture(n_layers=1, d_model=2, d_sae=3, activation="relu"))
    h = torch.tensor([[[-1.0, 0.0, 2.0]]])
    assert torch.equal(clt.activate(h), torch.tensor([[[0.0, 0.0, 2.0]]]))


@pytest.mark.parametrize("ste_to_input", [False, True])
def test_jumprelu_gradients_match_formulas(ste_to_input):
    torch.manual_seed(0)
    eps = 0.5
    h = torch.randn(64, 3, 5, dtype=torch.float64) * 0.5  # [N, L, F]
    theta = torch.rand(3, 5, dtype=torch.float64) * 0.5 + 0.1  # [L, F]
    h.requires_grad_(True)
    theta.requires_grad_(True)
    g = torch.randn(64, 3, 5, dtype=torch.float64)
    (act.jumprelu(h, theta, eps, ste_to_input) * g).sum().backward()

    hd, td = h.detach(), theta.detach()
    K = ((hd - td).abs() < eps / 2).double()  # rectangle kernel K((h − θ)/ε)
    expected_theta = (-(td / eps) * K * g).sum(0)  # ∂a/∂θ = −(θ/ε)·K, summed over tokens
    expected_h = (hd > td).double() * g  # ∂a/∂h = H(h − θ)
    if ste_to_input:
        expected_h = expected_h + (td / eps) * K * g
    torch.testing.assert_close(theta.grad, expected_theta)
    torch.testing.assert_close(h.grad, expected_h)
    assert (K.sum() > 0) and (theta.grad != 0).any()  # the band is exercised


def test_jumprelu_gradcheck_smooth_part():
    torch.manual_seed(0)
    theta = torch.full((2, 4), 0.3, dtype=torch.float64)
    h = torch.randn(5, 2, 4, dtype=torch.float64)
    h = torch.where((h - 0.3).abs() < 0.05, h + 0.2, h).requires_grad_(True)  # away from the jump
    assert torch.autograd.gradcheck(lambda x: act.jumprelu(x, theta, 1e-3), (h,))


def test_topk_gradcheck():
    torch.manual_seed(0)
    h = torch.randn(4, 2, 6, dtype=torch.float64, requires_grad=True)  # distinct values, no ties
    assert torch.autograd.gradcheck(lambda x: act.topk(x, 3), (h,))
