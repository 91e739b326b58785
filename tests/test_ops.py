"""torch.library.opcheck on every fused_loss operator: schema, fake kernel, autograd
registration and AOT dispatch, with and without requires_grad."""
import pytest
import torch

import fused_loss  # noqa: F401

ops = torch.ops.fused_loss


def _class_samples(requires_grad):
    out = []
    for shape, kw in [((5, 7), dict(weight=None, reduction=1, ignore_index=-100, label_smoothing=0.0)),
                      ((5, 7), dict(weight=torch.rand(7), reduction=0, ignore_index=2, label_smoothing=0.1)),
                      ((2, 7, 3), dict(weight=torch.rand(7), reduction=2, ignore_index=-100, label_smoothing=0.2))]:
        x = torch.randn(shape, requires_grad=requires_grad)
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]))
        out.append((x, t, kw))
    return out


def _prob_samples(requires_grad):
    out = []
    for shape, kw in [((5, 7), dict(weight=None, reduction=1, label_smoothing=0.0)),
                      ((2, 7, 3), dict(weight=torch.rand(7), reduction=0, label_smoothing=0.1)),
                      ((2, 7, 3), dict(weight=torch.rand(7), reduction=2, label_smoothing=0.1))]:
        x = torch.randn(shape, requires_grad=requires_grad)
        t = torch.softmax(torch.randn(shape), 1).requires_grad_(requires_grad)
        out.append((x, t, kw))
    return out


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_cross_entropy_forward_and_backward(requires_grad):
    for (x, t, kw), compute_grad in zip(_class_samples(requires_grad) * 2, [False] * 3 + [True] * 3):
        args = (x, t, kw["weight"], kw["reduction"], kw["ignore_index"], kw["label_smoothing"], compute_grad)
        torch.library.opcheck(ops.cross_entropy_forward, args)
        loss, stats, _ = ops.cross_entropy_forward(*args)
        grad = torch.ones_like(loss)
        torch.library.opcheck(ops.cross_entropy_backward,
                              (grad, x.detach(), t, kw["weight"], stats.detach(), kw["reduction"], kw["ignore_index"],
                               kw["label_smoothing"]))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_cross_entropy_prob_forward_and_backward(requires_grad):
    for (x, t, kw), compute_grad in zip(_prob_samples(requires_grad) * 2, [False] * 3 + [True] * 3):
        args = (x, t, kw["weight"], kw["reduction"], kw["label_smoothing"], compute_grad)
        torch.library.opcheck(ops.cross_entropy_prob_forward, args)
        loss, stats, _ = ops.cross_entropy_prob_forward(*args)
        for input_grad, target_grad in [(True, True), (True, False), (False, True)]:
            torch.library.opcheck(ops.cross_entropy_prob_backward,
                                  (torch.ones_like(loss), x.detach(), t.detach(), kw["weight"], stats.detach(),
                                   kw["reduction"], kw["label_smoothing"], input_grad, target_grad))


def _elementwise_samples(requires_grad):
    x = torch.randn(6, 5, requires_grad=requires_grad)
    y = torch.rand(6, 5, requires_grad=requires_grad)
    return [
        ("binary_cross_entropy_with_logits", (x, y, torch.rand(5), torch.rand(5) + 0.5), 1, ()),
        ("binary_cross_entropy_with_logits", (x, y, None, None), 0, ()),
        ("smooth_l1_loss", (x, y), 1, (0.5,)),
        ("smooth_l1_loss", (x, y), 0, (0.0,)),
        ("huber_loss", (x, y, None), 2, (0.5,)),
        ("huber_loss", (x, y, torch.rand(6, 5)), 1, (1.5,)),
        ("sigmoid_focal_loss", (x, y), 0, (0.25, 2.0)),
        ("sigmoid_focal_loss", (x, y), 1, (-1.0, 1.5)),
    ]


@pytest.mark.parametrize("compute_grad", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_elementwise_losses(requires_grad, compute_grad):
    for name, tensors, reduction, params in _elementwise_samples(requires_grad):
        fwd, bwd = getattr(ops, f"{name}_forward"), getattr(ops, f"{name}_backward")
        torch.library.opcheck(fwd, (*tensors, reduction, *params, compute_grad))
        loss, grad = fwd(*tensors, reduction, *params, compute_grad)
        assert grad.numel() == (tensors[0].numel() if compute_grad and reduction != 0 else 0)
        detached = tuple(t.detach() if torch.is_tensor(t) else t for t in tensors)
        for flags in [(True, True), (True, False), (False, True)]:
            torch.library.opcheck(bwd, (torch.ones_like(loss), *detached, reduction, *params, *flags))
