"""LoRA: the shared layer on every architecture, merging, the adapter checkpoint, and Hugging Face PEFT both ways."""

import json

import pytest
import torch

from llmzoo.checkpoints import save_checkpoint
from llmzoo.hf import from_peft, lightning_checkpoint, to_hf, to_peft
from llmzoo.lora import (LoRASettings, add_lora, available_targets, load_adapter, lora_modules, lora_state_dict,
                         merge_lora, save_adapter)
from tiny import TINY_CONFIGS, tiny_model

ALL_LINEAR = ("q", "k", "v", "out", "gate", "up", "down")


def targets_of(model) -> list[str]:
    """Every target the model has (the head only when it is not tied)."""
    found = available_targets(model)
    if model.lm_head.weight is model.embed.weight:
        found.discard("head")
    return sorted(found)


def randomize_adapters(model, std: float = 0.1) -> None:
    with torch.no_grad():
        for module in lora_modules(model):
            for param in module.parameters():
                param.normal_(0.0, std)


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_zero_adapters_leave_logits_bit_identical_and_only_they_train(name):
    model = tiny_model(name).eval()
    ids = torch.randint(0, 97, (2, 12))
    before = model(ids)
    targets = targets_of(model)
    add_lora(model, r=8, alpha=16, targets=targets)
    assert torch.equal(model(ids), before)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and trainable
    assert all(".adapter." in n or ".adapters." in n for n in trainable)
    assert model.state_dict().keys() >= {n for n, _ in tiny_model(name).named_parameters()}  # base names unchanged


@pytest.mark.parametrize("name", ["GPT2", "Llama", "Mixtral", "Qwen3"])
def test_merge_after_training_matches_the_adapted_model(name):
    model = tiny_model(name)
    add_lora(model, r=8, alpha=16, dropout=0.1, targets=targets_of(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    for step in range(3):
        loss = model.training_step(torch.randint(0, 97, (2, 17)), step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # the base never moves
    model.eval()
    ids = torch.randint(0, 97, (2, 12))
    adapted = model(ids)
    assert not torch.allclose(adapted, tiny_model(name).eval()(ids))
    merge_lora(model)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    assert (model(ids) - adapted).abs().max() <= 1e-5
    assert model.state_dict().keys() == tiny_model(name).state_dict().keys()


def test_fused_loss_trains_the_head_adapter():
    model = tiny_model("Llama")
    add_lora(model, targets=["head"])
    randomize_adapters(model)
    batch = torch.randint(0, 97, (2, 17))
    fused, _, _ = model.token_nll(batch)
    reference = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    assert torch.allclose(fused, reference, atol=1e-6)
    fused.backward()
    assert model.lm_head.adapter.A["head"].grad.abs().sum() > 0


def test_adapter_checkpoint_is_small_and_loads_back(tmp_path):
    from llmzoo import Llama

    preset = dict(vocab_size=4096, embed_dim=128, num_heads=4, num_kv_heads=2, num_layers=4,
                  max_position_embeddings=256)  # configs/llama.yaml, the tiny CPU preset
    model = Llama(**preset)
    add_lora(model, r=8, alpha=16, targets=["q", "v"])
    randomize_adapters(model)
    save_checkpoint(lightning_checkpoint(model), tmp_path / "full.ckpt")
    save_adapter(model, tmp_path / "adapter.ckpt")
    size, full = (tmp_path / "adapter.ckpt").stat().st_size, (tmp_path / "full.ckpt").stat().st_size
    assert size < 0.05 * full, (size, full)
    again = Llama(**preset)
    again.load_state_dict({k: v for k, v in model.state_dict().items() if ".adapter." not in k})
    load_adapter(again, tmp_path / "adapter.ckpt")
    ids = torch.randint(0, 4096, (2, 9))
    assert torch.equal(again.eval()(ids), model.eval()(ids))


def test_lora_is_a_model_setting_that_checkpoints_rebuild(tmp_path):
    model = tiny_model("Mistral", lora=LoRASettings(r=4, targets=["q", "k", "v", "out", "down"]), lr_decay_steps=10)
    assert model.hparams.lora == {"r": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["q", "k", "v", "out", "down"]}
    randomize_adapters(model)
    save_checkpoint(lightning_checkpoint(model), tmp_path / "run.ckpt")
    again = type(model).load_from_checkpoint(tmp_path / "run.ckpt")
    ids = torch.randint(0, 97, (2, 9))
    assert torch.equal(again.eval()(ids), model.eval()(ids))
    assert {n for n, p in again.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    optimized = {p for group in model.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert optimized == {p for module in lora_modules(model) for p in module.parameters()}


@pytest.mark.parametrize("settings, message", [
    (dict(r=0), "r must be a positive integer"),
    (dict(r=-2), "r must be a positive integer"),
    (dict(targets=["query"]), "unknown LoRA targets ['query']"),
    (dict(targets=["experts"]), "match no layer"),
    (dict(targets=["gate"]), "match no layer"),
    (dict(targets=["head"]), "tied to its embedding"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    model = tiny_model("GPT2")  # tied head, GELU MLP, no experts
    with pytest.raises(ValueError) as error:
        add_lora(model, **settings)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # nothing changed


def test_experts_need_a_rank_the_grouped_matmul_can_take():
    with pytest.raises(ValueError, match="divisible by 8"):
        add_lora(tiny_model("Mixtral"), r=4, targets=["experts"])


# ====================================================================== PEFT
PEFT_CASES = {  # llmzoo model, LoRA targets (everything PEFT can hold for the family)
    "GPT2": (dict(tie_word_embeddings=False), ["q", "v", "out", "up", "down", "head"]),
    "Llama": ({}, list(ALL_LINEAR) + ["head"]),
    "Mistral": ({}, ["q", "k", "v", "out", "up"]),
    "Mixtral": ({}, ["q", "k", "v", "out", "head"]),
}


@pytest.mark.parametrize("name", PEFT_CASES)
def test_peft_round_trip(name, tmp_path):
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from hf_reference import randomize
    from test_hf import load_transformers

    overrides, targets = PEFT_CASES[name]
    model = tiny_model(name, vocab_size=101, **overrides).eval()
    randomize(model)
    to_hf(model, tmp_path / "base")
    add_lora(model, r=4, alpha=12, targets=targets)
    randomize_adapters(model)
    to_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    reference = peft.PeftModel.from_pretrained(load_transformers(tmp_path / "base"), tmp_path / "adapter").eval()
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        ours, theirs = model(ids), reference(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-5

    back = tiny_model(name, vocab_size=101, **overrides).eval()  # and back onto a fresh llmzoo base
    back.load_state_dict(model.state_dict(), strict=False)
    from_peft(back, tmp_path / "adapter")
    with torch.no_grad():
        assert (back(ids) - theirs).abs().max() <= 1e-5
    assert {n for n, p in back.named_parameters() if p.requires_grad} == set(lora_state_dict(back))


def test_a_peft_directory_of_another_family_is_refused(tmp_path):
    gpt2 = tiny_model("GPT2", vocab_size=101)
    add_lora(gpt2, targets=["q", "v"])
    to_peft(gpt2, tmp_path / "adapter")
    llama = tiny_model("Llama", vocab_size=101)
    with pytest.raises(ValueError, match=r"adapts transformer\.h\.0\.attn\.c_attn, which is not a projection of this "
                                         r"llama model") as error:
        from_peft(llama, tmp_path / "adapter")
    assert "\n" not in str(error.value) and not lora_modules(llama)


def test_exports_refuse_what_they_cannot_write(tmp_path):
    model = tiny_model("Llama")
    add_lora(model, targets=["q"])
    with pytest.raises(ValueError, match="has LoRA adapters: export them with to_peft"):
        to_hf(model, tmp_path / "hf")
    mixtral = tiny_model("Mixtral")
    add_lora(mixtral, targets=["experts", "q"])
    with pytest.raises(ValueError, match="mixture-of-experts weights"):
        to_peft(mixtral, tmp_path / "peft")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "peft").exists()
