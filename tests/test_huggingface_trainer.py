"""fused_loss.integrations.huggingface under the tools that inspect or wrap a model: transformers'
Trainer with its default arguments (its column filter reads the forward's signature), gradient
accumulation (num_items_in_batch), a Trainer subclass that passes num_items_in_batch itself (as
TRL's trainers do), save_pretrained / from_pretrained, generate, copy.deepcopy and pickle,
torch.compile, and a PEFT LoRA model around a patched one. Tiny randomly initialised models
built from configs (no download)."""
import copy
import inspect
import os
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fused_loss.integrations.huggingface import (  # noqa: E402
    FusedForward, apply_fused_linear_cross_entropy, is_fused, remove_fused_linear_cross_entropy)

VOCAB = 97


def qwen2(seed=0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(config).float()


def pair(seed=0):
    model = qwen2(seed)
    return model, apply_fused_linear_cross_entropy(copy.deepcopy(model))


def examples(n=32, seed=0):
    """Rows of different lengths (padded by the collate function) with a prompt not trained on."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (int(torch.randint(5, 13, (), generator=g)),), generator=g).tolist()
        labels = [-100] * (i % 3) + ids[i % 3:]
        rows.append({"input_ids": ids, "labels": labels, "note": f"row {i}"})  # "note": a column to drop
    return rows


def collate(rows):
    """Pads to the longest row: input 0 with attention mask 0, label -100."""
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda v, fill: v + [fill] * (width - len(v))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r["input_ids"], 0) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows]),
            "labels": torch.tensor([pad(r["labels"], -100) for r in rows])}


def train(model, tmp_path, data, trainer_class=None, **args):
    """4 optimizer steps of transformers' Trainer, default arguments but for the batch, the
    accumulation and what keeps the run quiet; returns the logged losses."""
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, **args)
    trainer = (trainer_class or transformers.Trainer)(model=model, args=arguments, train_dataset=data,
                                                      data_collator=collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_same_run(model, fused, losses, fused_losses, weight_atol):
    assert len(losses) == len(fused_losses) == 4
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(fused.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=weight_atol, msg=lambda m: f"{name}: {m}")
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), qwen2().parameters()))  # it trained


def test_the_patched_forward_presents_the_models_signature():
    model, fused = pair()
    assert inspect.signature(fused.forward) == inspect.signature(model.forward)
    assert "input_ids" in inspect.signature(fused.forward).parameters
    assert fused.forward.__wrapped__ == model.forward.__func__.__get__(fused)
    assert fused.forward.__name__ == "forward"
    remove_fused_linear_cross_entropy(fused)
    assert not is_fused(fused) and "forward" not in fused.__dict__


@pytest.mark.parametrize("source", ["datasets", "list"])
def test_trainer_with_default_arguments_equals_the_unfused_run(tmp_path, source):
    """Default remove_unused_columns=True: the columns the forward names are kept (they were all
    dropped when the patched forward showed only *args, **kwargs), the others ("note") dropped;
    gradient accumulation over 2 micro-batches of padded rows. AdamW, its default."""
    data = examples()
    if source == "datasets":
        datasets = pytest.importorskip("datasets")
        data = datasets.Dataset.from_list(data)
    model, fused = pair()
    losses = train(model, tmp_path / "unfused", data)
    fused_losses = train(fused, tmp_path / "fused", data)
    assert is_fused(fused)
    assert_same_run(model, fused, losses, fused_losses, weight_atol=2e-5)


def test_trainer_sgd_weights_equal_the_unfused_run(tmp_path):
    """SGD is not invariant to the loss's scale as AdamW is: a wrong num_items_in_batch shows here."""
    model, fused = pair(seed=1)
    data = examples(seed=1)
    args = dict(optim="sgd", learning_rate=0.5)
    assert_same_run(model, fused, train(model, tmp_path / "u", data, **args), train(fused, tmp_path / "f", data, **args),
                    weight_atol=1e-5)


class PassesNumItems(transformers.Trainer):
    """As TRL's trainers: compute_loss calls the model with num_items_in_batch itself."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def test_trainer_subclass_that_passes_num_items_in_batch(tmp_path):
    model, fused = pair(seed=2)
    data = examples(seed=2)
    args = dict(optim="sgd", learning_rate=0.5)
    assert_same_run(model, fused, train(model, tmp_path / "u", data, PassesNumItems, **args),
                    train(fused, tmp_path / "f", data, PassesNumItems, **args), weight_atol=1e-5)


def _loss(model, seed=0):
    batch = collate(examples(4, seed))
    return model(**batch).loss


def test_save_pretrained_and_from_pretrained_after_patching(tmp_path):
    """The patch is the instance's, not its weights' or config's: what is saved loads as the
    model's own class, unpatched, with the same weights."""
    model, fused = pair()
    fused.save_pretrained(tmp_path)
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert not is_fused(loaded)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(_loss(apply_fused_linear_cross_entropy(loaded)), _loss(model), rtol=1e-5, atol=1e-6)


def test_generate_runs_the_models_own_forward():
    model, fused = pair()
    prompt = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(fused.generate(prompt, **kw), model.generate(prompt, **kw))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_patched_model_is_patched_and_uses_its_own_weights(how):
    model, fused = pair()
    clone = copy.deepcopy(fused) if how == "deepcopy" else pickle.loads(pickle.dumps(fused))
    assert is_fused(clone) and isinstance(clone.forward, FusedForward) and clone.forward.model is clone
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.5)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        for p in changed.parameters():
            p.mul_(1.5)
    batch = collate(examples(4))
    # Without labels the copy runs its own forward on its own weights (not the first model's).
    torch.testing.assert_close(clone(input_ids=batch["input_ids"]).logits, changed(input_ids=batch["input_ids"]).logits)
    torch.testing.assert_close(_loss(clone), _loss(changed), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_loss(fused), _loss(model), rtol=1e-5, atol=1e-6)  # the first one is untouched


def test_torch_compile_of_a_patched_model():
    torch._dynamo.reset()
    model, fused = pair()
    compiled = torch.compile(fused)
    loss = _loss(compiled)
    assert compiled(**collate(examples(4))).logits is None
    torch.testing.assert_close(loss, _loss(model), rtol=1e-5, atol=1e-6)


def test_peft_lora_around_a_patched_model():
    peft = pytest.importorskip("peft")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model, fused = pair()
    want_model = peft.get_peft_model(model, peft.LoraConfig(**config))
    got_model = peft.get_peft_model(fused, peft.LoraConfig(**config))
    with torch.no_grad():  # the same adapters on both sides (LoRA's A is random, its B starts at 0)
        for (name, a), (_, b) in zip(got_model.named_parameters(), want_model.named_parameters()):
            if "lora_" in name:
                a.copy_(torch.randn_like(a) * 0.1)
                b.copy_(a)
    got, want = _loss(got_model), _loss(want_model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    lora = [(n, p) for n, p in got_model.named_parameters() if p.requires_grad]
    assert lora and all("lora" in n for n, _ in lora)
    for (name, a), (_, b) in zip(lora, [(n, p) for n, p in want_model.named_parameters() if p.requires_grad]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert got_model(**collate(examples(4))).logits is None
