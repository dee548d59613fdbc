import torch

from atlas.transcoders.activations import ActivationConfig, apply_activation, jumprelu, topk_relu


def test_jumprelu_forward_keeps_only_values_strictly_above_threshold() -> None:
    pre = torch.tensor([[0.05, 0.1, 0.2, -1.0]])
    out = jumprelu(pre, torch.tensor([0.1, 0.1, 0.1, 0.1]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.2, 0.0]]))


def test_jumprelu_threshold_gradient_is_rectangle_kernel() -> None:
    bandwidth = 0.5
    pre = torch.tensor([[0.05, 0.3, 0.9], [0.2, -0.5, 0.4]], requires_grad=True)
    threshold = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    out = jumprelu(pre, threshold, bandwidth)
    out.sum().backward()
    # pre-activation gradient: 1 where active, 0 elsewhere
    assert pre.grad is not None and threshold.grad is not None
    assert pre.grad.tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    # threshold gradient: −θ/ε for every token with |pre − θ| < ε/2
    inside = ((pre.detach() - threshold.detach()).abs() < bandwidth / 2).float()
    expected = (-(threshold.detach() / bandwidth) * inside).sum(0)
    torch.testing.assert_close(threshold.grad, expected)
    assert inside.sum(0).tolist() == [2.0, 1.0, 1.0]


def test_topk_keeps_k_largest_positive() -> None:
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-3.0, -2.0, -1.0, 0.1]])
    out = topk_relu(pre, 2)
    torch.testing.assert_close(out, torch.tensor([[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.1]]))


def test_apply_activation_dispatch_and_validation() -> None:
    pre = torch.tensor([[-1.0, 2.0]])
    assert apply_activation(pre, ActivationConfig("relu"), None).tolist() == [[0.0, 2.0]]
    try:
        ActivationConfig("topk")
    except ValueError as err:
        assert "k >= 1" in str(err)
    else:
        raise AssertionError("TopK without k must be rejected")
