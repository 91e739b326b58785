"""fused_loss ops inside torch.compile(fullgraph=True): no graph breaks, same values and
gradients as eager."""
import torch

import fused_loss


def _loss_and_grad(fn, x, t, **kw):
    x = x.clone().requires_grad_()
    loss = fn(x, t, **kw)
    loss.backward()
    return loss.detach(), x.grad


def test_compile_fullgraph_class_targets():
    torch._dynamo.reset()
    x, t = torch.randn(16, 100), torch.randint(0, 100, (16,))
    t[3] = -100
    kw = dict(weight=torch.rand(100), label_smoothing=0.1)
    compiled = torch.compile(fused_loss.cross_entropy, fullgraph=True)
    eager = _loss_and_grad(fused_loss.cross_entropy, x, t, **kw)
    got = _loss_and_grad(compiled, x, t, **kw)
    torch.testing.assert_close(got[0], eager[0])
    torch.testing.assert_close(got[1], eager[1])


def test_compile_fullgraph_probability_targets_in_a_model():
    torch._dynamo.reset()
    model = torch.nn.Linear(8, 10)
    loss_fn = fused_loss.CrossEntropyLoss(label_smoothing=0.05)

    def step(inp, target):
        return loss_fn(model(inp), target)

    inp, target = torch.randn(4, 8), torch.softmax(torch.randn(4, 10), 1)
    compiled = torch.compile(step, fullgraph=True)
    ref = step(inp, target)
    ref.backward()
    ref_grad = model.weight.grad.clone()
    model.weight.grad = None
    got = compiled(inp, target)
    got.backward()
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(model.weight.grad, ref_grad)


def test_compile_fullgraph_elementwise_losses():
    torch._dynamo.reset()
    pos_weight = torch.rand(7) + 0.5

    def losses(x, y):
        return (fused_loss.binary_cross_entropy_with_logits(x, y, pos_weight=pos_weight)
                + fused_loss.smooth_l1_loss(x, y, beta=0.5) + fused_loss.huber_loss(x, y, delta=0.5)
                + fused_loss.sigmoid_focal_loss(x, y, reduction="mean"))

    x, y = torch.randn(5, 7), torch.rand(5, 7)
    compiled = torch.compile(losses, fullgraph=True)
    eager = _loss_and_grad(losses, x, y)
    got = _loss_and_grad(compiled, x, y)
    torch.testing.assert_close(got[0], eager[0])
    torch.testing.assert_close(got[1], eager[1])
