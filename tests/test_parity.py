"""Logit parity with Hugging Face transformers: HF models built from tiny configs with random weights
(no hub), weights copied through llmzoo's mapping, logits compared in fp32 with atol 1e-5."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmzoo import Llama, Mixtral  # noqa: E402
from llmzoo.hf import from_hf, hf_state_dict, load_hf_state_dict  # noqa: E402

from hf_reference import CASES, VOCAB, hf_model  # noqa: E402

ATOL = 1e-5


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


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "mistral-window", "mixtral-top2-of-4", "qwen2", "qwen3"])
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
    for case in ("gpt", "gpt2", "gpt2-untied", "llama-gqa", "mistral-window", "qwen2", "qwen2-untied", "qwen3",
                 "qwen3-tied-mqa"):
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
