"""fused_loss.integrations.huggingface on tiny randomly initialised causal LMs built from configs
(no download): the loss and every parameter's gradient equal the model's own loss's."""
import copy
import functools
import os

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (the optional hf extra)")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fused_loss.integrations.huggingface import (  # noqa: E402
    apply_fused_linear_cross_entropy, is_fused, remove_fused_linear_cross_entropy)
from helpers import assert_close_to_torch  # noqa: E402

VOCAB = 211


def llama(tied=False):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


def gemma2():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       final_logit_softcapping=0.5,  # small: it must matter attn_logit_softcapping=50.0,
                                       attn_implementation="eager")
    return transformers.Gemma2ForCausalLM(config)


MODELS = {"llama": llama, "llama-tied": lambda: llama(tied=True), "gemma2-softcap": gemma2}


def batch(seed=0, rows=3, length=9):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    labels = input_ids.clone()
    labels[0, :3] = -100  # a prompt that is not trained on
    labels[2, -2:] = -100  # padding
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, -2:] = 0
    return input_ids, labels, attention_mask


def pair(make, seed=0):
    torch.manual_seed(seed)
    model = make().float().train()
    fused = copy.deepcopy(model)
    apply_fused_linear_cross_entropy(fused)
    return model, fused


def loss_and_grads(model, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**kw)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def float64_loss_and_grads(model, labels, num_items_in_batch=None, shift_labels=None, **kw):
    """The model's own loss (transformers' ForCausalLMLoss) and gradients on a float64 copy of the model: the
    float64 reference of tests/helpers.py's rule. The loss is taken of the float64 logits (ForCausalLMLoss would
    round them to float32 first); transformers keeps its RMSNorm and eager softmax in float32 inside."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    model = copy.deepcopy(model).double()
    model.zero_grad(set_to_none=True)
    logits = model(**kw).logits
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    loss = fixed_cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), num_items_in_batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_close_to_the_models_own(got, got_grads, want, want_grads, model, loss_tol, **kw):
    """Loss and gradients by tests/helpers.py's rule (torch's float32 rounding is its CPU kernels')."""
    ref = functools.cache(lambda: float64_loss_and_grads(model, **kw))
    assert_close_to_torch(got.loss, want.loss, lambda: ref()[0], "loss", tol=loss_tol)
    assert want_grads.keys() == got_grads.keys()
    for name in want_grads:
        assert_close_to_torch(got_grads[name], want_grads[name], lambda name=name: ref()[1][name], name,
                              tol=dict(atol=1e-6, rtol=1e-4))


def assert_same(model, fused, **kw):
    want, want_grads = loss_and_grads(model, **kw)
    got, got_grads = loss_and_grads(fused, **kw)
    assert got.logits is None and want.logits is not None
    assert_close_to_the_models_own(got, got_grads, want, want_grads, model, dict(atol=1e-6, rtol=1e-5), **kw)


@pytest.mark.parametrize("name", MODELS)
def test_loss_and_gradients_equal_the_models_own(name):
    model, fused = pair(MODELS[name])
    input_ids, labels, attention_mask = batch()
    assert_same(model, fused, input_ids=input_ids, labels=labels, attention_mask=attention_mask)


@pytest.mark.parametrize("name", ["llama", "gemma2-softcap"])
def test_num_items_in_batch_and_shift_labels(name):
    model, fused = pair(MODELS[name], seed=1)
    input_ids, labels, attention_mask = batch(seed=1)
    # gradient accumulation: the sum over this micro-batch divided by the whole batch's token count
    assert_same(model, fused, input_ids=input_ids, labels=labels, attention_mask=attention_mask,
                num_items_in_batch=torch.tensor(40))
    assert_same(model, fused, input_ids=input_ids, labels=labels, num_items_in_batch=40)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    shift[1, 4] = -100
    assert_same(model, fused, input_ids=input_ids, labels=labels, shift_labels=shift)


def test_softcap_is_taken_from_the_config():
    # Without the softcap the loss would differ: the test above can fail.
    model, fused = pair(gemma2, seed=2)
    input_ids, labels, _ = batch(seed=2)
    fused.config.final_logit_softcapping = None
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=input_ids, labels=labels).loss,
                                  fused(input_ids=input_ids, labels=labels).loss, rtol=1e-4)


def test_without_labels_the_forward_is_the_models_own():
    model, fused = pair(llama, seed=3)
    input_ids, labels, _ = batch(seed=3)
    with torch.no_grad():
        want, got = model(input_ids=input_ids), fused(input_ids=input_ids)
        torch.testing.assert_close(got.logits, want.logits)
        assert got.loss is None
        kept = fused(input_ids=input_ids, logits_to_keep=1)
        torch.testing.assert_close(kept.logits, want.logits[:, -1:])


def test_remove_restores_the_original_forward():
    model = llama()
    forward = model.forward
    apply_fused_linear_cross_entropy(model)
    assert is_fused(model)
    apply_fused_linear_cross_entropy(model, chunk_size=4)  # re-applying wraps the original, not the wrapper
    input_ids, labels, _ = batch(seed=4)
    assert model(input_ids=input_ids, labels=labels).logits is None
    remove_fused_linear_cross_entropy(model)
    assert not is_fused(model) and "forward" not in model.__dict__
    assert model.forward == forward
    assert model(input_ids=input_ids, labels=labels).logits is not None


def test_bfloat16_autocast_training_step():
    model, fused = pair(llama, seed=5)
    input_ids, labels, _ = batch(seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, want_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
        got, got_grads = loss_and_grads(fused, input_ids=input_ids, labels=labels)
    assert got.loss.dtype == want.loss.dtype == torch.float32
    torch.testing.assert_close(got.loss, want.loss, rtol=2e-2, atol=2e-2)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=5e-2, atol=5e-3,
                                   msg=lambda m: f"{name}: {m}")


def test_a_model_without_a_linear_head_is_refused():
    with pytest.raises(TypeError, match="fused_loss.apply_fused_linear_cross_entropy"):
        apply_fused_linear_cross_entropy(torch.nn.Linear(3, 4))


def test_bfloat16_model_gives_a_float32_loss_as_transformers():
    model, fused = pair(llama, seed=6)
    model, fused = model.bfloat16(), fused.bfloat16()
    input_ids, labels, _ = batch(seed=6)
    with torch.no_grad():
        want = model(input_ids=input_ids, labels=labels).loss
        got = fused(input_ids=input_ids, labels=labels).loss
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_patch_routes_the_models_own_loss_through_fused_loss():
    # fused_loss.patch() alone (no apply): transformers' loss calls torch.nn.functional.cross_entropy.
    import fused_loss

    model, _ = pair(llama, seed=7)
    input_ids, labels, _ = batch(seed=7)
    want, want_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    with fused_loss.patch():
        got, got_grads = loss_and_grads(model, input_ids=input_ids, labels=labels)
    assert "fused_loss" in type(got.loss.grad_fn).__name__
    # the loss: torch.testing.assert_close's float32 default, kept
    assert_close_to_the_models_own(got, got_grads, want, want_grads, model, dict(atol=1e-5, rtol=1.3e-6),
                                   input_ids=input_ids, labels=labels)
