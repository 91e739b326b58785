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


def test_compiled_code_runs_the_fused_ops_even_after_a_torch_func_transform():
    # Regression: composite.needs_composite asked peek_interpreter_stack(), which torch.compile
    # traced as "a transform is active" (once functorch had been used in the process), so compiled
    # calls silently ran torch's composition instead of the fused kernels.
    from torch._inductor.utils import run_and_get_code

    x, t = torch.randn(8, 33, requires_grad=True), torch.randint(0, 33, (8,))
    torch.func.grad(lambda z: fused_loss.cross_entropy(z, t))(x.detach())
    for step in (lambda x, t: fused_loss.cross_entropy(x, t, label_smoothing=0.1),
                 lambda x, t: fused_loss.smooth_l1_loss(x, x.detach() * 0.5)):
        torch._dynamo.reset()
        got, code = run_and_get_code(torch.compile(step, fullgraph=True), x, t)
        assert "torch.ops.fused_loss." in "\n".join(code)
        torch.testing.assert_close(got, step(x, t))
    torch._dynamo.reset()
