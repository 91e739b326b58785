"""Hugging Face causal LMs whose loss never materialises the logits.

    from fused_loss.integrations.huggingface import apply_fused_linear_cross_entropy
    model = apply_fused_linear_cross_entropy(AutoModelForCausalLM.from_pretrained(...))

With labels, the patched forward runs the model's decoder, then
`fused_loss.linear_cross_entropy` on the final hidden states and the lm_head weight (chunked:
the (tokens x vocabulary) logits never exist), with the model's own loss semantics
(transformers' `ForCausalLMLoss`): labels shifted left by one (or the `shift_labels` given),
`ignore_index` -100 (or the one given), the mean over the tokens not ignored, or the sum divided
by `num_items_in_batch` when that is given (gradient accumulation), and the config's
`final_logit_softcapping` (Gemma 2) as fused_loss's `softcap`. The output is the model's usual
`CausalLMOutputWithPast` with `logits=None`. Without labels, or with `logits_to_keep` set, the
model's own forward runs unchanged.

Differences from the model's own loss, both of precision only: transformers rounds the logits
to the model's dtype before upcasting them (and takes the softcap's tanh in that dtype); here the
logits are products in the model's dtype whose softcap and softmax are computed in float32. The
loss is float32, as transformers'.

transformers is optional: importing fused_loss never imports it; this module needs it only to
build the output (`pip install transformers`, or the `hf` extra).
"""
import inspect

import torch

from ..functional import linear_cross_entropy



def _require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("fused_loss.integrations.huggingface needs transformers: pip install transformers "
                          "(or fused_loss[hf])") from e


def _head_and_decoder(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if not isinstance(head, torch.nn.Linear) or decoder is None or decoder is model:
        raise TypeError(f"fused_loss.apply_fused_linear_cross_entropy: expected a causal LM with a decoder "
                        f"(get_decoder()) and an nn.Linear output embedding (get_output_embeddings()), got "
                        f"{type(model).__name__}")
    return head, decoder


def apply_fused_linear_cross_entropy(model, *, chunk_size=None):
    """Patch this model instance (returned, for chaining) so that its forward with labels computes
    the loss with fused_loss.linear_cross_entropy and returns logits=None. `chunk_size`: rows
    per chunk of fused_loss.linear_cross_entropy (default: its own). Undo with
    remove_fused_linear_cross_entropy(model). Patching a patched model only updates chunk_size.

    The patched `model.forward` presents the model's own signature (`inspect.signature`), so that
    tools which read it (Trainer's column filter and its `num_items_in_batch` check, PEFT,
    accelerate) see the model's forward; `model.forward.__wrapped__` is the model's own forward."""
    _require_transformers()
    _head_and_decoder(model)  # fail now, not at the first batch
    current = model.__dict__.get("forward")
    original = current.original if isinstance(current, FusedForward) else current
    model.__dict__["forward"] = FusedForward(model, original, chunk_size)
    return model


def remove_fused_linear_cross_entropy(model):
    """Restore the model's own forward (returns the model)."""
    current = model.__dict__.get("forward")
    if isinstance(current, FusedForward):
        if current.original is None:
            del model.__dict__["forward"]
        else:
            model.__dict__["forward"] = current.original
    return model


def is_fused(model) -> bool:
    """Whether apply_fused_linear_cross_entropy patched this model."""
    return isinstance(model.__dict__.get("forward"), FusedForward)


class FusedForward:
    """The patched forward of one model: with labels (and every logit kept, and a dict asked for),
    the fused loss; otherwise the model's own forward. `original`: a forward the instance had of
    its own (an accelerate hook's, say), or None for its class's forward, looked up at each call so
    that copy.deepcopy and pickle keep this model's forward (a bound method kept here would pickle
    and copy as the first model's). A plain object, not a closure, so the model pickles."""

    def __init__(self, model, original, chunk_size):
        self.model, self.original, self.chunk_size = model, original, chunk_size

    def own_forward(self):
        return self.original if self.original is not None else type(self.model).forward.__get__(self.model)

    @property
    def __wrapped__(self):
        return self.own_forward()

    @property
    def __signature__(self):
        return inspect.signature(self.own_forward())

    @property
    def __name__(self):
        return getattr(self.own_forward(), "__name__", "forward")

    def __call__(self, *args, **kwargs):
        own = self.own_forward()
        signature = inspect.signature(own)
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        var_keyword = _var_keyword(signature)
        extra = arguments.pop(var_keyword, {}) if var_keyword else {}
        labels = arguments.pop("labels", None)
        logits_to_keep = arguments.pop("logits_to_keep", 0)
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        if labels is None or not keep_all or extra.get("return_dict") is False:
            return own(*args, **kwargs)
        return _fused_forward(self.model, labels, {**arguments, **extra}, self.chunk_size)

    def __repr__(self):
        return f"<fused_loss forward of {type(self.model).__name__} (chunk_size={self.chunk_size})>"


def _var_keyword(signature):
    return next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)


def _fused_forward(model, labels, kwargs, chunk_size):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    head, decoder = _head_and_decoder(model)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = decoder(**kwargs)
    hidden = outputs[0]
    if shift_labels is None:  # tokens < n predict n; the last position predicts nothing
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, shift_labels.reshape(-1),
                                linear_bias=head.bias, ignore_index=ignore_index,
                                reduction="mean" if num_items_in_batch is None else "sum",
                                softcap=softcap, chunk_size=chunk_size,
                                _loss_dtype=torch.float32)  # as transformers' loss, not rounded first
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))
