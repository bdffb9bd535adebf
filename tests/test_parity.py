"""Logit parity with Hugging Face transformers: HF models built from tiny configs with random weights
(no hub), weights copied through llmzoo's mapping, logits compared in fp32 with atol 1e-5."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmzoo import GPT, GPT2, Llama, Mistral, Mixtral  # noqa: E402
from llmzoo.hf import from_hf, hf_state_dict, load_hf_state_dict  # noqa: E402

ATOL = 1e-5
VOCAB = 101
GPT_SIZES = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
LLAMA_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

CASES = {
    "gpt": (transformers.OpenAIGPTConfig, GPT_SIZES, GPT),
    "gpt2": (transformers.GPT2Config, GPT_SIZES, GPT2),
    "gpt2-untied": (transformers.GPT2Config, dict(GPT_SIZES, tie_word_embeddings=False), GPT2),
    "llama-gqa": (transformers.LlamaConfig, LLAMA_SIZES, Llama),
    "llama-mqa-tied": (transformers.LlamaConfig, dict(LLAMA_SIZES, num_key_value_heads=1, tie_word_embeddings=True), Llama),
    "llama-mha-bias-headdim": (transformers.LlamaConfig, dict(LLAMA_SIZES, num_key_value_heads=4, head_dim=16,
                                                             attention_bias=True, mlp_bias=True), Llama),
    "llama3-rope-scaling": (transformers.LlamaConfig, dict(LLAMA_SIZES, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)), Llama),
    "llama-linear-rope": (transformers.LlamaConfig, dict(LLAMA_SIZES, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0)), Llama),
    "mistral-window": (transformers.MistralConfig, dict(LLAMA_SIZES, sliding_window=5), Mistral),
    "mixtral-top2-of-4": (transformers.MixtralConfig, dict(LLAMA_SIZES, num_local_experts=4, num_experts_per_tok=2), Mixtral),
    "mixtral-window": (transformers.MixtralConfig, dict(LLAMA_SIZES, num_local_experts=4, num_experts_per_tok=2,
                                                        sliding_window=6), Mixtral),
}


def randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere, norms included (HF initialises norms to exactly 1 and biases to 0)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)


def hf_model(case: str):
    config_cls, sizes, _ = CASES[case]
    config = config_cls(**sizes, attn_implementation="eager")
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model)
    return model


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hugging_face(case):
    reference = hf_model(case)
    model = from_hf(reference).eval()
    assert type(model) is CASES[case][2]
    input_ids = torch.randint(0, VOCAB, (3, 40))  # longer than every sliding window above
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = model(input_ids)
    diff = (actual - expected).abs().max().item()
    assert diff <= ATOL, f"{case}: max |logit diff| = {diff:.2e}"


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "mistral-window", "mixtral-top2-of-4"])
def test_left_padded_batch_matches_hugging_face(case):
    """An attention mask with left padding: positions count real tokens only, as in HF generate."""
    reference = hf_model(case)
    model = from_hf(reference).eval()
    input_ids = torch.randint(0, VOCAB, (2, 16))
    mask = torch.ones_like(input_ids)
    mask[0, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = reference(input_ids, attention_mask=mask, position_ids=positions).logits
        actual = model(input_ids, attention_mask=mask)
    real = mask.bool()
    diff = (actual[real] - expected[real]).abs().max().item()
    assert diff <= ATOL, f"{case}: max |logit diff| on real tokens = {diff:.2e}"


def test_mixtral_per_expert_layout_loads():
    """Checkpoints on disk hold Mixtral experts one by one (block_sparse_moe.experts.N.w1/w2/w3)."""
    reference = hf_model("mixtral-top2-of-4")
    model = from_hf(reference).eval()
    per_expert = hf_state_dict(model)
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in per_expert
    fused = reference.state_dict()
    w1 = per_expert["model.layers.1.block_sparse_moe.experts.2.w1.weight"]
    assert torch.equal(w1, fused["model.layers.1.mlp.experts.gate_up_proj"][2, :48])
    again = Mixtral(**dict(model.hparams))
    load_hf_state_dict(again, per_expert)
    ids = torch.randint(0, VOCAB, (1, 12))
    assert torch.equal(again.eval()(ids), model(ids))


def test_export_names_round_trip_for_every_family():
    for case in ("gpt", "gpt2", "gpt2-untied", "llama-gqa", "mistral-window"):
        reference = hf_model(case)
        exported = hf_state_dict(from_hf(reference))
        expected = {k: v for k, v in reference.state_dict().items()
                    if not (k == "lm_head.weight" and reference.config.tie_word_embeddings)}
        assert exported.keys() == expected.keys(), case
        for name, tensor in expected.items():
            assert torch.equal(exported[name], tensor), (case, name)


def test_mismatched_weights_are_named():
    reference = hf_model("llama-gqa")
    state = reference.state_dict()
    state["model.layers.0.extra.weight"] = torch.zeros(1)
    del state["model.norm.weight"]
    cls_model = Llama(**dict(from_hf(reference).hparams))
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\].*unexpected \['model.layers.0.extra.weight'\]"):
        load_hf_state_dict(cls_model, state)
    state = reference.state_dict()
    state["model.norm.weight"] = torch.ones(7)
    with pytest.raises(ValueError, match=r"shape mismatch for norm.weight .*\(7,\).*\(32,\)"):
        load_hf_state_dict(cls_model, state)
