"""Hugging Face interop: config and state-dict mapping between transformers and llmzoo.

Each family is a list of :class:`Rule` s, one per llmzoo tensor, that say which Hugging Face tensors
it is made of and how (copied, transposed from Conv1D, concatenated, stacked over experts). The same
rules run in both directions, so import and export cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from llmzoo.models import GPT, GPT2, CausalLM, Llama, Mistral, Mixtral

FAMILIES = {"openai-gpt": GPT, "gpt2": GPT2, "llama": Llama, "mistral": Mistral, "mixtral": Mixtral}
HF_CLASS_NAMES = {"openai-gpt": "OpenAIGPTLMHeadModel", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}


@dataclass(frozen=True)
class Rule:
    """llmzoo tensor ``ours`` = HF tensors ``theirs`` combined by ``how``:

    - ``copy``: the same tensor;  ``transpose``: a Conv1D weight ``[in, out]`` of an ``nn.Linear``;
    - ``concat``: rows concatenated (fused q|k|v, gate|up), split again by ``sizes`` on export;
    - ``experts``: per-expert matrices stacked on a new first dim; ``theirs`` lists them expert by
      expert, ``group`` at a time concatenated by rows (w1|w3 of one expert for ``gate_up``).
    """

    ours: str
    theirs: tuple[str, ...]
    how: str = "copy"
    sizes: tuple[int, ...] = ()
    group: int = 1

    def to_ours(self, tensors: list[Tensor]) -> Tensor:
        if self.how == "copy":
            return tensors[0]
        if self.how == "transpose":
            return tensors[0].t()
        if self.how == "concat":
            return torch.cat(tensors, dim=0)
        groups = [torch.cat(tensors[i:i + self.group], dim=0) for i in range(0, len(tensors), self.group)]
        return torch.stack(groups)

    def to_theirs(self, tensor: Tensor) -> list[Tensor]:
        if self.how == "copy":
            return [tensor]
        if self.how == "transpose":
            return [tensor.t()]
        if self.how == "concat":
            return list(tensor.split(list(self.sizes), dim=0))
        return [part for expert in tensor for part in expert.chunk(self.group, dim=0)]


def _gpt_rules(model: CausalLM, prefix: str = "transformer.") -> list[Rule]:
    """GPT-1 (``tokens_embed``, ``positions_embed``) and GPT-2 (``wte``, ``wpe``, ``ln_f``): Conv1D layers."""
    gpt2 = isinstance(model, GPT2)
    rules = [Rule("embed.weight", (prefix + ("wte" if gpt2 else "tokens_embed") + ".weight",)),
             Rule("positions.weight", (prefix + ("wpe" if gpt2 else "positions_embed") + ".weight",))]
    if gpt2:
        rules += [Rule(f"norm.{p}", (f"{prefix}ln_f.{p}",)) for p in ("weight", "bias")]
    if not model.hparams.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    pairs = [("attention.qkv", "attn.c_attn"), ("attention.out", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
             ("mlp.down", "mlp.c_proj"), ("attention_norm", "ln_1"), ("mlp_norm", "ln_2")]
    for i in range(len(model.blocks)):
        for ours, theirs in pairs:
            linear = not ours.endswith("norm")
            rules.append(Rule(f"blocks.{i}.{ours}.weight", (f"{prefix}h.{i}.{theirs}.weight",),
                              "transpose" if linear else "copy"))
            rules.append(Rule(f"blocks.{i}.{ours}.bias", (f"{prefix}h.{i}.{theirs}.bias",)))
    return rules


def _llama_rules(model: CausalLM, fused_experts: bool = False) -> list[Rule]:
    """Llama / Mistral / Mixtral (``model.layers.i.self_attn.q_proj`` ...). Mixtral experts are written
    per expert (``block_sparse_moe.experts.e.w1``), as checkpoints on disk hold them, or with
    ``fused_experts`` in the in-memory layout of transformers 5 (``mlp.experts.gate_up_proj``)."""
    hp = model.hparams
    head_dim = hp.head_dim or hp.embed_dim // hp.num_heads
    q_size, kv_size = hp.num_heads * head_dim, (hp.num_kv_heads or hp.num_heads) * head_dim
    params = ["weight", "bias"] if hp.bias else ["weight"]
    rules = [Rule("embed.weight", ("model.embed_tokens.weight",)), Rule("norm.weight", ("model.norm.weight",))]
    if not hp.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
    for i in range(len(model.blocks)):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        attn = theirs + "self_attn."
        rules += [Rule(ours + "attention_norm.weight", (theirs + "input_layernorm.weight",)),
                  Rule(ours + "mlp_norm.weight", (theirs + "post_attention_layernorm.weight",))]
        for p in params:
            rules += [Rule(ours + f"attention.qkv.{p}", tuple(f"{attn}{n}_proj.{p}" for n in "qkv"), "concat",
                           (q_size, kv_size, kv_size)),
                      Rule(ours + f"attention.out.{p}", (f"{attn}o_proj.{p}",))]
        if not isinstance(model, Mixtral):
            for p in params:
                rules += [Rule(ours + f"mlp.gate_up.{p}", (f"{theirs}mlp.gate_proj.{p}", f"{theirs}mlp.up_proj.{p}"),
                               "concat", (model.ffn_dim, model.ffn_dim)),
                          Rule(ours + f"mlp.down.{p}", (f"{theirs}mlp.down_proj.{p}",))]
        elif fused_experts:
            rules += [Rule(ours + "mlp.router.weight", (theirs + "mlp.gate.weight",)),
                      Rule(ours + "mlp.gate_up", (theirs + "mlp.experts.gate_up_proj",)),
                      Rule(ours + "mlp.down", (theirs + "mlp.experts.down_proj",))]
        else:
            moe = theirs + "block_sparse_moe."
            experts = range(hp.num_experts)
            rules += [Rule(ours + "mlp.router.weight", (moe + "gate.weight",)),
                      Rule(ours + "mlp.gate_up", tuple(f"{moe}experts.{e}.{w}.weight" for e in experts for w in ("w1", "w3")),
                           "experts", group=2),
                      Rule(ours + "mlp.down", tuple(f"{moe}experts.{e}.w2.weight" for e in experts), "experts")]
    return rules


# HF tensors that carry no weights of their own (buffers, the tied head)
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$|^lm_head\.weight$)")


def state_dict_rules(model: CausalLM, hf_state_dict: dict[str, Tensor] | None = None) -> list[Rule]:
    """The rules mapping ``model``'s tensors to a Hugging Face state dict (whose layout they follow
    where two are in use: GPT-2 without the ``transformer.`` prefix, fused Mixtral experts)."""
    keys = hf_state_dict.keys() if hf_state_dict is not None else ()
    if isinstance(model, GPT):
        prefix = "" if keys and not any(k.startswith("transformer.") for k in keys) else "transformer."
        return _gpt_rules(model, prefix)
    if isinstance(model, Llama):
        return _llama_rules(model, fused_experts=any(k.endswith("mlp.experts.gate_up_proj") for k in keys))
    raise ValueError(f"{type(model).__name__} has no Hugging Face twin: only {', '.join(sorted(HF_CLASS_NAMES.values()))} map")


def load_hf_state_dict(model: CausalLM, hf_state_dict: dict[str, Tensor]) -> None:
    """Copy a Hugging Face state dict into ``model``; every tensor must be used and every weight found."""
    rules = state_dict_rules(model, hf_state_dict)
    needed = {name for rule in rules for name in rule.theirs}
    missing = sorted(needed - hf_state_dict.keys())
    unexpected = sorted(k for k in hf_state_dict.keys() - needed if not _IGNORED.search(k))
    if missing or unexpected:
        raise ValueError(f"Hugging Face weights do not match {type(model).__name__}: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    ours = model.state_dict()
    converted = {}
    for rule in rules:
        tensor = rule.to_ours([hf_state_dict[name] for name in rule.theirs])
        if tensor.shape != ours[rule.ours].shape:
            raise ValueError(f"shape mismatch for {rule.ours} (from {', '.join(rule.theirs[:2])}): "
                             f"Hugging Face gives {tuple(tensor.shape)}, the model has {tuple(ours[rule.ours].shape)}")
        converted[rule.ours] = tensor
    model.load_state_dict(converted, strict=False)
    untouched = sorted(set(ours) - set(converted) - {"lm_head.weight"} - _buffers(model))
    if untouched:
        raise ValueError(f"no Hugging Face tensor maps to {untouched}")


def hf_state_dict(model: CausalLM) -> dict[str, Tensor]:
    """``model``'s weights under Hugging Face names and layouts (contiguous, ready for safetensors)."""
    ours = model.state_dict()
    return {name: tensor.contiguous() for rule in state_dict_rules(model)
            for name, tensor in zip(rule.theirs, rule.to_theirs(ours[rule.ours]))}


def _buffers(model: CausalLM) -> set[str]:
    return {name for name, _ in model.named_buffers()}


def _rope(config: dict) -> tuple[float, dict | None]:
    """``(rope_theta, rope_scaling)`` from ``rope_parameters`` (transformers 5) or the legacy keys."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", config.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    return theta, (params if kind != "default" else None)


def config_from_hf(config: dict) -> tuple[type[CausalLM], dict]:
    """The llmzoo class and its arguments for a Hugging Face ``config.json`` dict."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported: llmzoo imports {', '.join(FAMILIES)}")
    cls = FAMILIES[model_type]
    tied = bool(config.get("tie_word_embeddings", model_type in ("openai-gpt", "gpt2")))
    if model_type in ("openai-gpt", "gpt2"):
        act = config.get("afn" if model_type == "openai-gpt" else "activation_function", "gelu_new")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh") or (model_type == "gpt2" and act == "gelu"):
            raise ValueError(f"{model_type} with activation {act!r} is not supported: llmzoo's GPT family uses GELU (tanh)")
        if config.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("scale_attn_by_inverse_layer_idx=True is not supported")
        return cls, dict(vocab_size=config["vocab_size"], embed_dim=config["n_embd"], num_heads=config["n_head"],
                         num_layers=config["n_layer"], max_position_embeddings=config["n_positions"],
                         dropout=float(config.get("resid_pdrop", 0.1)), ffn_dim=config.get("n_inner"),
                         norm_eps=float(config.get("layer_norm_epsilon", 1e-5)), tie_word_embeddings=tied)
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported: Llama-family models use 'silu'")
    if bool(config.get("attention_bias", False)) != bool(config.get("mlp_bias", False)) and model_type == "llama":
        raise ValueError("attention_bias != mlp_bias is not supported: llmzoo's Llama has one `bias` switch")
    theta, scaling = _rope(config)
    kwargs = dict(vocab_size=config["vocab_size"], embed_dim=config["hidden_size"],
                  num_heads=config["num_attention_heads"], num_layers=config["num_hidden_layers"],
                  max_position_embeddings=config["max_position_embeddings"],
                  dropout=float(config.get("attention_dropout", 0.0)),
                  num_kv_heads=config.get("num_key_value_heads"), head_dim=config.get("head_dim"),
                  ffn_dim=config["intermediate_size"], norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                  rope_theta=theta, rope_scaling=scaling, bias=bool(config.get("attention_bias", False)),
                  tie_word_embeddings=tied)
    if model_type in ("mistral", "mixtral"):
        kwargs["sliding_window"] = config.get("sliding_window")
    if model_type == "mixtral":
        kwargs.update(num_experts=config["num_local_experts"], experts_per_token=config["num_experts_per_tok"],
                      aux_loss_coef=float(config.get("router_aux_loss_coef", 0.001)))
    return cls, kwargs


def from_hf(hf_model) -> CausalLM:
    """An llmzoo model with the weights of a transformers model object (``*ForCausalLM``)."""
    config = hf_model.config.to_dict()
    cls, kwargs = config_from_hf(config)
    model = cls(**kwargs)
    load_hf_state_dict(model, hf_model.state_dict())
    return model.to(next(hf_model.parameters()).dtype)
