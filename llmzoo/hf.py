"""Hugging Face interop: read and write checkpoint directories that transformers loads.

- :func:`from_hf` builds an llmzoo model from a Hugging Face directory (``config.json`` +
  ``model.safetensors`` or a sharded index) or from a transformers model object;
- :func:`to_hf` writes a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer`` /
  ``pipeline("text-generation")`` load offline;
- :func:`convert_hf_to_checkpoint` / :func:`convert_checkpoint_to_hf` do the same with Lightning checkpoints.

transformers is never imported here: directories are read and written with ``json`` and ``safetensors``,
and no code named by a checkpoint (``auto_map``) is ever run.

Each family is a list of :class:`Rule` s, one per llmzoo tensor, that say which Hugging Face tensors
it is made of and how (copied, transposed from Conv1D, concatenated, stacked over experts). The same
rules run in both directions, so import and export cannot drift apart.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from llmzoo.models import ARCHITECTURES, GPT, GPT2, CausalLM, Llama, Mistral, Mixtral
from llmzoo.checkpoints import ARCHITECTURE_KEY, qualified_name
from llmzoo.models.build import empty_model, fill_model, load_checkpoint_model

FAMILIES = {"openai-gpt": GPT, "gpt2": GPT2, "llama": Llama, "mistral": Mistral, "mixtral": Mixtral}
HF_CLASS_NAMES = {"openai-gpt": "OpenAIGPTLMHeadModel", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


# ====================================================================== state-dict rules
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


def hf_model_type(model: CausalLM) -> str:
    """The Hugging Face ``model_type`` of ``model``'s family (its nearest llmzoo ancestor with an HF twin)."""
    types = {family: model_type for model_type, family in FAMILIES.items()}
    for cls in type(model).__mro__:
        if cls in types:
            return types[cls]
    raise ValueError(f"{type(model).__name__} has no Hugging Face twin: only "
                     f"{', '.join(f.__name__ for f in FAMILIES.values())} (and their subclasses) map to transformers")


def state_dict_rules(model: CausalLM, hf_state_dict: dict[str, Tensor] | None = None) -> list[Rule]:
    """The rules mapping ``model``'s tensors to a Hugging Face state dict (whose layout they follow
    where two are in use: GPT-2 without the ``transformer.`` prefix, fused Mixtral experts)."""
    keys = hf_state_dict.keys() if hf_state_dict is not None else ()
    if hf_model_type(model) in ("openai-gpt", "gpt2"):
        prefix = "" if keys and not any(k.startswith("transformer.") for k in keys) else "transformer."
        return _gpt_rules(model, prefix)
    return _llama_rules(model, fused_experts=any(k.endswith("mlp.experts.gate_up_proj") for k in keys))


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def convert_hf_state_dict(model: CausalLM, hf_state_dict: dict[str, Tensor], pop: bool = False) -> dict[str, Tensor]:
    """``hf_state_dict`` under ``model``'s names and layouts; every tensor must be used and every
    shape right. ``pop`` empties ``hf_state_dict`` as it goes (halves peak memory for big models)."""
    rules = state_dict_rules(model, hf_state_dict)
    needed = {name for rule in rules for name in rule.theirs}
    missing = sorted(needed - hf_state_dict.keys())
    unexpected = sorted(k for k in hf_state_dict.keys() - needed if not _IGNORED.search(k))
    if missing or unexpected:
        raise ValueError(f"Hugging Face weights do not match {type(model).__name__}: "
                         f"missing {_listing(missing)}, unexpected {_listing(unexpected)}")
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items()}
    converted = {}
    for rule in rules:
        parts = [hf_state_dict.pop(name) if pop else hf_state_dict[name] for name in rule.theirs]
        tensor = rule.to_ours(parts)
        if tensor.shape != shapes[rule.ours]:
            raise ValueError(f"shape mismatch for {rule.ours} (from {', '.join(rule.theirs[:2])}): "
                             f"Hugging Face gives {tuple(tensor.shape)}, the model has {tuple(shapes[rule.ours])}")
        converted[rule.ours] = tensor
    return converted


def load_hf_state_dict(model: CausalLM, hf_state_dict: dict[str, Tensor]) -> None:
    """Copy a Hugging Face state dict into ``model``; every tensor must be used and every weight found."""
    converted = convert_hf_state_dict(model, hf_state_dict)
    model.load_state_dict(converted, strict=False)
    untouched = sorted(set(model.state_dict()) - set(converted) - {"lm_head.weight"} - _buffers(model))
    if untouched:
        raise ValueError(f"no Hugging Face tensor maps to {untouched}")


def hf_state_dict(model: CausalLM) -> dict[str, Tensor]:
    """``model``'s weights under Hugging Face names and layouts (Mixtral experts one by one)."""
    ours = model.state_dict()
    return {name: tensor.contiguous() for rule in state_dict_rules(model)
            for name, tensor in zip(rule.theirs, rule.to_theirs(ours[rule.ours]))}


def _buffers(model: CausalLM) -> set[str]:
    return {name for name, _ in model.named_buffers()}


# ====================================================================== config mapping
# transformers' defaults for the fields llmzoo reads, used when a config.json leaves one out
_HF_DEFAULTS = {
    "openai-gpt": dict(vocab_size=40478, n_positions=512, n_embd=768, n_layer=12, n_head=12, afn="gelu",
                       resid_pdrop=0.1, layer_norm_epsilon=1e-5, tie_word_embeddings=True),
    "gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function="gelu_new", resid_pdrop=0.1, layer_norm_epsilon=1e-5, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False, add_cross_attention=False, tie_word_embeddings=True),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, attention_bias=False, mlp_bias=False,
                  attention_dropout=0.0, tie_word_embeddings=False, rope_theta=10000.0),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, attention_dropout=0.0,
                    tie_word_embeddings=False, rope_theta=10000.0, sliding_window=4096),
}
_HF_DEFAULTS["mixtral"] = dict(_HF_DEFAULTS["mistral"], rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                               num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001,
                               router_jitter_noise=0.0)
_NULL_MEANS_SOMETHING = {"num_key_value_heads", "head_dim", "n_inner", "sliding_window"}  # others: null = default
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # transformers' names for GELU (tanh)
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope_scaling(params: dict, max_position_embeddings: int) -> dict | None:
    """``rope_scaling`` in llmzoo's form (``{"rope_type": ..., <its float / int fields>}``, None for plain
    RoPE) from a Hugging Face rope dict; refuses the kinds llmzoo does not implement."""
    params = dict(params)
    params.pop("rope_theta", None)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind == "default":
        return None
    if kind not in _ROPE_KEYS:
        raise ValueError(f"rope_type {kind!r} is not supported: llmzoo implements 'default', "
                         f"{', '.join(repr(k) for k in _ROPE_KEYS)}")
    if float(params.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported: llmzoo rotates every head dimension")
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    extra = sorted(set(params) - set(_ROPE_KEYS[kind]))
    if extra:
        raise ValueError(f"rope parameters {extra} of rope_type {kind!r} are not supported")
    return {"rope_type": kind, **{key: int(params[key]) if key == "original_max_position_embeddings"
                                  else float(params[key]) for key in _ROPE_KEYS[kind]}}


def config_from_hf(config: dict) -> tuple[type[CausalLM], dict]:
    """The llmzoo class and its arguments for a Hugging Face ``config.json`` dict.

    Fields that change the math are all mapped or refused with a ``ValueError``; ``auto_map`` (remote
    code) is ignored: ``model_type`` alone picks the architecture."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported: llmzoo imports {', '.join(FAMILIES)}")
    if config.get("quantization_config"):
        raise ValueError("quantized checkpoints (quantization_config) are not supported: "
                         "use the unquantized weights")
    cls = FAMILIES[model_type]
    given = {key: value for key, value in config.items() if value is not None or key in _NULL_MEANS_SOMETHING}
    config = {**_HF_DEFAULTS[model_type], **given}
    tied = bool(config["tie_word_embeddings"])
    if model_type in ("openai-gpt", "gpt2"):
        return cls, _gpt_kwargs(config, model_type, tied)
    if config["hidden_act"] != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported: Llama-family models use 'silu'")
    if model_type == "llama" and bool(config["attention_bias"]) != bool(config["mlp_bias"]):
        raise ValueError("attention_bias != mlp_bias is not supported: llmzoo's Llama has one `bias` switch")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}  # as transformers: rope_scaling wins
    theta = float(rope.get("rope_theta") or config["rope_theta"])
    scaling = _rope_scaling(rope, config["max_position_embeddings"])
    kwargs = dict(vocab_size=config["vocab_size"], embed_dim=config["hidden_size"],
                  num_heads=config["num_attention_heads"], num_layers=config["num_hidden_layers"],
                  max_position_embeddings=config["max_position_embeddings"],
                  dropout=float(config["attention_dropout"]),
                  num_kv_heads=config["num_key_value_heads"], head_dim=config["head_dim"],
                  ffn_dim=config["intermediate_size"], norm_eps=float(config["rms_norm_eps"]),
                  rope_theta=theta, rope_scaling=scaling, bias=model_type == "llama" and bool(config["attention_bias"]),
                  tie_word_embeddings=tied)
    if model_type in ("mistral", "mixtral"):
        kwargs["sliding_window"] = config["sliding_window"]
    if model_type == "mixtral":
        if config["router_jitter_noise"]:
            warnings.warn(f"router_jitter_noise={config['router_jitter_noise']} is ignored: llmzoo's router adds "
                          f"no training noise (inference is unaffected)", stacklevel=3)
        kwargs.update(num_experts=config["num_local_experts"], experts_per_token=config["num_experts_per_tok"],
                      aux_loss_coef=float(config["router_aux_loss_coef"]))
    return cls, kwargs


def _gpt_kwargs(config: dict, model_type: str, tied: bool) -> dict:
    if model_type == "openai-gpt" and config["afn"] != "gelu":
        raise ValueError(f"openai-gpt with afn {config['afn']!r} is not supported: llmzoo's GPT uses 'gelu' "
                         f"(the tanh approximation in transformers)")
    if model_type == "gpt2":
        if config["activation_function"] not in _TANH_GELUS:
            raise ValueError(f"gpt2 with activation_function {config['activation_function']!r} is not supported: "
                             f"llmzoo's GPT2 uses GELU (tanh), one of {', '.join(_TANH_GELUS)}")
        for key, expected in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                              ("add_cross_attention", False)):
            if bool(config[key]) != expected:
                raise ValueError(f"gpt2 with {key}={config[key]} is not supported: llmzoo's GPT2 needs {key}={expected}")
    return dict(vocab_size=config["vocab_size"], embed_dim=config["n_embd"], num_heads=config["n_head"],
                num_layers=config["n_layer"], max_position_embeddings=config["n_positions"],
                dropout=float(config["resid_pdrop"]), ffn_dim=config.get("n_inner"),
                norm_eps=float(config["layer_norm_epsilon"]), tie_word_embeddings=tied)


def config_to_hf(model: CausalLM, dtype: torch.dtype | None = None) -> dict:
    """The Hugging Face ``config.json`` dict of ``model`` with weights in ``dtype`` (default: the model's);
    floats are written as floats (transformers' configs are strictly typed). Raises ``ValueError`` for
    what transformers cannot represent."""
    model_type, hp = hf_model_type(model), model.hparams
    dtype = dtype or _model_dtype(model)
    common = dict(architectures=[HF_CLASS_NAMES[model_type]], model_type=model_type, vocab_size=hp.vocab_size,
                  tie_word_embeddings=bool(hp.tie_word_embeddings), dtype=str(dtype).removeprefix("torch."),
                  use_cache=True)
    dropout = float(hp.dropout)
    if model_type in ("openai-gpt", "gpt2"):
        ffn_dim = hp.ffn_dim
        if model.activation != "gelu_tanh":
            raise ValueError(f"{type(model).__name__} with activation {model.activation!r} cannot be exported: "
                             f"transformers' {model_type} uses GELU (tanh)")
        if model_type == "openai-gpt" and ffn_dim not in (None, 4 * hp.embed_dim):
            raise ValueError(f"GPT with ffn_dim={ffn_dim} cannot be exported: openai-gpt's MLP is 4 * embed_dim "
                             f"= {4 * hp.embed_dim} wide (use GPT2, whose n_inner is free)")
        config = dict(common, n_positions=hp.max_position_embeddings, n_embd=hp.embed_dim, n_layer=hp.num_layers,
                      n_head=hp.num_heads, layer_norm_epsilon=float(hp.norm_eps), resid_pdrop=dropout,
                      embd_pdrop=dropout, attn_pdrop=dropout)
        if model_type == "openai-gpt":
            return dict(config, afn="gelu")
        return dict(config, n_inner=ffn_dim, activation_function="gelu_new", scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    if hp.bias and model_type != "llama":
        raise ValueError(f"{type(model).__name__} with bias=True cannot be exported: transformers' {model_type} "
                         f"has no projection biases (Llama has: attention_bias, mlp_bias)")
    scaling = _rope_scaling(hp.rope_scaling or {}, hp.max_position_embeddings)
    rope = {"rope_type": "default", **(scaling or {}), "rope_theta": float(hp.rope_theta)}
    config = dict(common, hidden_size=hp.embed_dim, intermediate_size=model.ffn_dim, num_hidden_layers=hp.num_layers,
                  num_attention_heads=hp.num_heads, num_key_value_heads=hp.num_kv_heads or hp.num_heads,
                  head_dim=hp.head_dim or hp.embed_dim // hp.num_heads, hidden_act="silu",
                  max_position_embeddings=hp.max_position_embeddings, rms_norm_eps=float(hp.norm_eps),
                  attention_dropout=dropout, rope_parameters=rope,
                  # legacy keys, for tools on transformers 4.x (rope_parameters wins in transformers 5)
                  rope_theta=float(hp.rope_theta), rope_scaling=scaling)
    if model_type == "llama":
        return dict(config, attention_bias=bool(hp.bias), mlp_bias=bool(hp.bias))
    config["sliding_window"] = hp.sliding_window
    if model_type == "mistral":
        return config
    return dict(config, num_local_experts=hp.num_experts, num_experts_per_tok=hp.experts_per_token,
                router_aux_loss_coef=float(hp.aux_loss_coef), router_jitter_noise=0.0, output_router_logits=False)


# ====================================================================== files
def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.bfloat16`` from ``torch.bfloat16``, ``"bfloat16"``, ``"bf16"`` ... (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))
    if not isinstance(getattr(torch, name, None), torch.dtype) or not getattr(torch, name).is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype: use float32, bfloat16 or float16")
    return getattr(torch, name)


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtypes = Counter(p.dtype for p in model.parameters())
    return dtypes.most_common(1)[0][0]


def _parse_size(size: int | str) -> int:
    """Bytes from ``5_000_000``, ``"5GB"`` (10^9) or ``"5GiB"`` (2^30), like transformers' ``max_shard_size``."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size: use bytes or a string like '5GB' or '500MiB'")
    unit = (match.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(match.group(1)) * scale)


def read_hf_config(directory: str | os.PathLike) -> dict:
    """``config.json`` of a Hugging Face model directory."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: llmzoo reads local Hugging Face directories "
                                f"(nothing is downloaded)")
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Hugging Face model directory holds config.json beside its weights")
    return json.loads(path.read_text())


def _shard_path(directory: Path, name: str) -> Path:
    """A shard named by an index, refused if the name leaves the directory."""
    if Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"index in {directory} names the shard {name!r}: shards must be plain file names")
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} named by the index is missing")
    return path


def load_hf_weights(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face directory: ``model.safetensors`` or the shards of
    ``model.safetensors.index.json``. Pickled ``pytorch_model.bin`` files can run code when loaded: they
    are refused unless ``allow_pickle``, and then read with ``torch.load(weights_only=True)``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if (directory / SAFETENSORS_INDEX).is_file():
        return _load_sharded(directory, SAFETENSORS_INDEX, load_file)
    if (directory / SAFETENSORS).is_file():
        return load_file(directory / SAFETENSORS)
    pickles = [name for name in (PICKLE_INDEX, PICKLE) if (directory / name).is_file()]
    if pickles and not allow_pickle:
        raise ValueError(f"{directory} holds pickled weights ({pickles[0]}), which can run code when loaded: "
                         f"convert them to safetensors, or pass allow_pickle=True (--allow_pickle) if you trust "
                         f"the file (it is then read with torch.load(weights_only=True))")
    if pickles:
        def load_pickle(path: Path) -> dict[str, Tensor]:
            return torch.load(path, map_location="cpu", weights_only=True)

        return _load_sharded(directory, PICKLE_INDEX, load_pickle) if pickles[0] == PICKLE_INDEX \
            else load_pickle(directory / PICKLE)
    raise FileNotFoundError(f"no weights in {directory}: expected {SAFETENSORS} or {SAFETENSORS_INDEX}")


def _load_sharded(directory: Path, index_name: str, load) -> dict[str, Tensor]:
    weight_map = json.loads((directory / index_name).read_text())["weight_map"]
    tensors: dict[str, Tensor] = {}
    for shard in dict.fromkeys(weight_map.values()):
        tensors.update(load(_shard_path(directory, shard)))
    absent = sorted(set(weight_map) - tensors.keys())
    if absent:
        raise ValueError(f"{index_name} in {directory} lists tensors its shards do not hold: {_listing(absent)}")
    return tensors


def save_hf_weights(tensors: dict[str, Tensor], directory: str | os.PathLike,
                    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[str]:
    """Write ``tensors`` as ``model.safetensors``, or as ``model-0000i-of-0000n.safetensors`` shards of at
    most ``max_shard_size`` (a single bigger tensor gets a shard of its own) plus
    ``model.safetensors.index.json``. Returns the file names written."""
    from safetensors.torch import save_file

    limit, shards, size = _parse_size(max_shard_size), [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    directory = Path(directory)
    names = [SAFETENSORS] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file({key: _own_storage(tensor) for key, tensor in shard.items()}, directory / name,
                  metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                              "total_parameters": sum(t.numel() for t in tensors.values())},
                 "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
        _write_json(directory / SAFETENSORS_INDEX, index)
        names.append(SAFETENSORS_INDEX)
    return names


def _own_storage(tensor: Tensor) -> Tensor:
    """A contiguous tensor that owns its storage (safetensors refuses views that share memory)."""
    tensor = tensor.detach().contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size() else tensor.clone()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextmanager
def _new_directory(directory: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``directory`` to fill; renamed into place only if the block succeeds, so
    ``directory`` is never left half-written. A non-empty ``directory`` is replaced only with
    ``overwrite`` and only if it is a model directory (holds ``config.json``)."""
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory: choose a directory path")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{target} is not empty: pass overwrite=True (--overwrite true) or choose a new directory")
        if not (target / "config.json").is_file():
            raise FileExistsError(f"{target} is not empty and holds no config.json: refusing to replace a "
                                  f"directory that is not a model directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = _sibling(target, "partial")
    temporary.mkdir()  # the umask applies, as for any directory the user makes
    try:
        yield temporary
        if target.exists():
            old = _sibling(target, "old")
            target.rename(old)
            temporary.rename(target)
            shutil.rmtree(old)
        else:
            temporary.rename(target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _sibling(path: Path, kind: str) -> Path:
    """A hidden, unused name beside ``path`` (same file system, so renames are atomic)."""
    return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}"


# ====================================================================== tokenizer
_SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")
_CONVENTIONAL = {  # added special tokens recognised by name when no role is given
    "bos_token": ("<|bos|>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"),
    "eos_token": ("<|eos|>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
    "pad_token": ("<|pad|>", "<pad>", "[PAD]"),
    "unk_token": ("<|unk|>", "<unk>", "[UNK]"),
}


def _as_tokenizers(tokenizer: Any):
    """``(tokenizers.Tokenizer, roles)`` from a ``tokenizers.Tokenizer``, a path to a ``tokenizer.json`` (or
    a directory holding one) or an object with a ``.tokenizer`` attribute (llmzoo's ``Tokenizer``), whose
    ``bos_token`` / ``eos_token`` / ... attributes give the roles."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found: pass a tokenizer.json or its directory")
        return Tokenizer.from_file(str(path)), {}
    if isinstance(tokenizer, Tokenizer):
        return tokenizer, {}
    inner = getattr(tokenizer, "tokenizer", None)
    if isinstance(inner, Tokenizer):
        roles = {role: getattr(tokenizer, role) for role in _SPECIAL_ROLES if isinstance(getattr(tokenizer, role, None), str)}
        return inner, roles
    raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, a path to a tokenizer.json or an object with a "
                    f".tokenizer attribute holding one, got {type(tokenizer).__name__}")


def special_tokens(tokenizer, roles: dict[str, str | None]) -> dict[str, str]:
    """The special tokens of ``tokenizer`` by role: ``roles`` first, then the tokenizer's added special
    tokens with conventional names (``<|eos|>``, ``</s>``, ``<|endoftext|>`` ...). Each must be in the vocabulary."""
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    found = {}
    for role in _SPECIAL_ROLES:
        token = roles.get(role) or next((t for t in _CONVENTIONAL[role] if t in added), None)
        if token is None:
            continue
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{role} {token!r} is not in the tokenizer's vocabulary: add it or pass another {role}")
        found[role] = token
    return found


def _save_tokenizer(tokenizer, tokens: dict[str, str], directory: Path, model_max_length: int) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` (class ``PreTrainedTokenizerFast``, so that AutoTokenizer
    never picks a slow class for the model type) and ``special_tokens_map.json``."""
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False, **tokens})
    _write_json(directory / "special_tokens_map.json", tokens)


# ====================================================================== public API
def from_hf(source, dtype: torch.dtype | str | None = None, allow_pickle: bool = False) -> CausalLM:
    """An llmzoo model (in eval mode) from a Hugging Face directory or a transformers model object.

    ``source``: a directory with ``config.json`` and ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``), or a ``*ForCausalLM`` object. Its ``model_type`` picks the class
    (``openai-gpt`` -> GPT, ``gpt2`` -> GPT2, ``llama``, ``mistral``, ``mixtral``). ``dtype``: of the weights;
    by default the files' own (bf16 stays bf16). ``allow_pickle``: accept ``pytorch_model.bin`` files,
    read with ``torch.load(weights_only=True)``. transformers is not needed for a directory.
    """
    dtype = _as_dtype(dtype)
    if isinstance(source, (str, os.PathLike)):
        config = read_hf_config(source)
        cls, kwargs = config_from_hf(config)
        tensors = load_hf_weights(source, allow_pickle)
        dtype = dtype or _files_dtype(tensors, config)
    else:  # a transformers model object: copy its tensors, it keeps its own
        cls, kwargs = config_from_hf(source.config.to_dict())
        tensors = {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}
        dtype = dtype or next(source.parameters()).dtype
    model = empty_model(cls, kwargs)
    converted = convert_hf_state_dict(model, tensors, pop=True)
    return fill_model(model, {name: t.to(dtype).contiguous() for name, t in converted.items()}).eval()


def _files_dtype(tensors: dict[str, Tensor], config: dict) -> torch.dtype:
    """The floating dtype of the files; if they mix dtypes, the config's ``dtype`` (else the most common)."""
    counts = Counter()
    for tensor in tensors.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    if len(counts) == 1:
        return next(iter(counts))
    declared = config.get("dtype") or config.get("torch_dtype")
    if isinstance(declared, str) and declared != "auto":
        return _as_dtype(declared)
    return counts.most_common(1)[0][0] if counts else torch.float32


def to_hf(model: CausalLM, directory: str | os.PathLike, tokenizer=None, dtype: torch.dtype | str | None = None,
          max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
          bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None,
          unk_token: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained``,
    ``AutoTokenizer.from_pretrained`` and ``pipeline("text-generation")`` load offline.

    Writes ``config.json``, ``model.safetensors`` (sharded past ``max_shard_size``, with
    ``model.safetensors.index.json``; Mixtral experts one by one), ``generation_config.json`` and, given a
    ``tokenizer`` (a ``tokenizers.Tokenizer``, a ``tokenizer.json`` path, or llmzoo's ``Tokenizer``),
    ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``. Special tokens come from
    the arguments, else from the tokenizer (see :func:`special_tokens`). ``dtype``: of the weights
    written (default: the model's). The directory appears complete or not at all; a non-empty one is
    replaced only with ``overwrite``. Returns the directory.
    """
    dtype = _as_dtype(dtype) or _model_dtype(model)
    config = config_to_hf(model, dtype)
    ids = {}
    if tokenizer is not None:
        tokenizer, roles = _as_tokenizers(tokenizer)
        given = dict(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token)
        tokens = special_tokens(tokenizer, {**roles, **{k: v for k, v in given.items() if v}})
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if size > model.hparams.vocab_size:
            raise ValueError(f"the tokenizer has {size} tokens but the model's vocab_size is "
                             f"{model.hparams.vocab_size}: export the tokenizer the model was trained with")
        ids = {role.replace("_token", "_token_id"): tokenizer.token_to_id(token) for role, token in tokens.items()
               if role != "unk_token"}
    elif any((bos_token, eos_token, pad_token, unk_token)):
        raise ValueError("special tokens were given without a tokenizer: pass tokenizer= as well")
    config.update({key: ids.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")})
    tensors = {name: tensor.to(dtype) for name, tensor in hf_state_dict(model).items()}
    with _new_directory(directory, overwrite) as temporary:
        _write_json(temporary / "config.json", config)
        _write_json(temporary / "generation_config.json", {k: v for k, v in ids.items() if v is not None})
        save_hf_weights(tensors, temporary, max_shard_size)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tokens, temporary, model.hparams.max_position_embeddings)
    return Path(directory)


# ====================================================================== Lightning checkpoints
_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"


def lightning_checkpoint(model: CausalLM) -> dict:
    """A Lightning checkpoint dict of ``model`` at step 0. Its class is recorded twice: under
    ``llmzoo_architecture`` (as llmzoo's checkpoints record it) and as ``_class_path`` in ``hyper_parameters``
    (as LightningCLI records it), so ``Llama.load_from_checkpoint(p)`` (with or without ``weights_only``) and
    ``llmzoo fit/validate --ckpt_path p`` rebuild it. The optimizer and scheduler lists are empty: ``fit``
    from it starts training with fresh ones."""
    import lightning

    return {"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__,
            "state_dict": model.state_dict(), "optimizer_states": [], "lr_schedulers": [],
            ARCHITECTURE_KEY: qualified_name(type(model)),
            "hyper_parameters": {"_instantiator": _INSTANTIATOR, "_class_path": qualified_name(type(model)),
                                 **dict(model.hparams)}}


def convert_hf_to_checkpoint(hf_dir: str | os.PathLike, ckpt_path: str | os.PathLike,
                             dtype: torch.dtype | str | None = None, allow_pickle: bool = False,
                             overwrite: bool = False) -> Path:
    """Hugging Face directory -> Lightning checkpoint (see :func:`from_hf` and :func:`lightning_checkpoint`).

    The directory's tokenizer (``tokenizer.json`` and the special tokens its ``tokenizer_config.json``
    names), when it has one, goes inside the checkpoint under ``"tokenizer"``, as llmzoo's runs keep theirs,
    so that ``llmzoo fit/validate/generate --ckpt_path`` use it. The file is written whole or not at all;
    an existing one is replaced only with ``overwrite``."""
    from llmzoo.data.tokenizer import Tokenizer

    ckpt_path = Path(ckpt_path)
    if ckpt_path.exists() and not overwrite:
        raise FileExistsError(f"{ckpt_path} exists: pass overwrite=True (--overwrite true) or choose another path")
    if ckpt_path.is_dir():
        raise IsADirectoryError(f"{ckpt_path} is a directory: give a checkpoint file path such as model.ckpt")
    tokenizer_file = Path(hf_dir) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tokenizer_file) if tokenizer_file.is_file() else None  # checked before any work
    checkpoint = lightning_checkpoint(from_hf(hf_dir, dtype=dtype, allow_pickle=allow_pickle))
    if tokenizer is not None:
        checkpoint["tokenizer"] = tokenizer.state_dict()
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _sibling(ckpt_path, "partial")
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, ckpt_path)
    finally:
        temporary.unlink(missing_ok=True)
    return ckpt_path


def convert_checkpoint_to_hf(ckpt_path: str | os.PathLike, hf_dir: str | os.PathLike, tokenizer=None,
                             model_class: str | type[CausalLM] | None = None, **to_hf_kwargs) -> Path:
    """Lightning checkpoint -> Hugging Face directory (see :func:`load_checkpoint_model` and :func:`to_hf`,
    whose keyword arguments ``dtype``, ``max_shard_size``, ``overwrite`` and the special tokens apply)."""
    return to_hf(load_checkpoint_model(ckpt_path, model_class), hf_dir, tokenizer, **to_hf_kwargs)
