"""Loss terms against direct computations with explicit loops."""

import torch

from clt import loss as losses


def test_reconstruction_is_fvu_normalised_mse():
    torch.manual_seed(0)
    y_hat, y = torch.randn(6, 3, 4), torch.randn(6, 3, 4)
    loss, sse, sst = losses.reconstruction(y_hat, y)
    for l in range(3):
        sse_l = sum(((y_hat[n, l] - y[n, l]) ** 2).sum() for n in range(6)) / 6
        mean = y[:, l].mean(0)
        sst_l = sum(((y[n, l] - mean) ** 2).sum() for n in range(6)) / 6
        torch.testing.assert_close(sse[l], sse_l)
        torch.testing.assert_close(sst[l], sst_l)
    torch.testing.assert_close(loss, sse.sum() / sst.sum())


def test_squared_error_gradients():
    """The one-pass squared error's hand-written backward, for ŷ and y, by finite differences."""
    torch.manual_seed(0)
    y_hat = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(losses.squared_error, (y_hat, y))
    torch.testing.assert_close(losses.squared_error(y_hat, y), (y_hat - y).pow(2).sum(-1).mean(0))


def test_reconstruction_is_batch_size_invariant():
    torch.manual_seed(0)
    y_hat, y = torch.randn(5, 2, 3), torch.randn(5, 2, 3)
    l1 = losses.reconstruction(y_hat, y)[0]
    l2 = losses.reconstruction(y_hat.repeat(3, 1, 1), y.repeat(3, 1, 1))[0]
    torch.testing.assert_close(l1, l2)


def test_tanh_sparsity_direct():
    torch.manual_seed(0)
    a, norms = torch.rand(4, 2, 3), torch.rand(2, 3)
    expected = (
        sum(torch.tanh(4.0 * a[n, l, i] * norms[l, i]) for n in range(4) for l in range(2) for i in range(3))
        / 4
    )
    torch.testing.assert_close(losses.tanh_sparsity(a, norms, 4.0), expected)


def test_preactivation_direct():
    torch.manual_seed(0)
    h, theta, norms = torch.randn(4, 2, 3), torch.rand(2, 3), torch.rand(2, 3)
    expected = (
        sum(
            max(0.0, float(theta[l, i] - h[n, l, i])) * norms[l, i]
            for n in range(4)
            for l in range(2)
            for i in range(3)
        )
        / 4
    )
    torch.testing.assert_close(losses.preactivation(h, theta, norms), expected)


def test_auxk_selects_top_dead_features():
    h = torch.tensor([[[5.0, 1.0, 3.0, 2.0]]])
    dead = torch.tensor([[False, True, True, True]])  # feature 0 is alive: never selected
    a = losses.auxk_activations(h, dead, k_aux=2)
    assert torch.equal(a, torch.tensor([[[0.0, 0.0, 3.0, 2.0]]]))


def test_auxk_loss_direct():
    torch.manual_seed(0)
    e_hat, e, sst = torch.randn(4, 2, 3), torch.randn(4, 2, 3), torch.rand(2) + 0.5
    expected = ((e_hat - e) ** 2).sum() / 4 / sst.sum()
    torch.testing.assert_close(losses.auxk(e_hat, e, sst), expected)


def test_ramp():
    assert losses.ramp(0, 100, 0.5) == 0.0
    assert losses.ramp(25, 100, 0.5) == 0.5
    assert losses.ramp(80, 100, 0.5) == 1.0


def test_row_norms_and_their_gradient_equal_vector_norm():
    from clt.model import row_norms

    torch.manual_seed(0)
    w = torch.randn(6, 10, dtype=torch.float64)
    w[2] = 0  # a zero row: gradient 0, as vector_norm's
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(6, dtype=torch.float64)
    (row_norms(w1) * g).sum().backward()
    (torch.linalg.vector_norm(w2, dim=1) * g).sum().backward()
    torch.testing.assert_close(row_norms(w1), torch.linalg.vector_norm(w2, dim=1))
    torch.testing.assert_close(w1.grad, w2.grad)
    assert torch.autograd.gradcheck(row_norms, (torch.randn(4, 5, dtype=torch.float64, requires_grad=True),))
