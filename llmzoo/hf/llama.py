"""Llama (``llama``): RMSNorm, RoPE, SwiGLU, grouped-query attention; the base of the Llama family's adapters
(Mistral, Mixtral, Qwen2, Qwen3), which override the hooks they change: :meth:`LlamaAdapter.biases` /
:meth:`LlamaAdapter.bias_config`, :meth:`LlamaAdapter.attention_rules`, :meth:`LlamaAdapter.mlp_rules`, and
``kwargs`` / ``config`` through ``super()``."""

from __future__ import annotations

from torch import nn

from llmzoo.hf.adapter import Adapter
from llmzoo.hf.rope import rope_from_hf, rope_to_hf
from llmzoo.hf.rules import Rule, linear_params
from llmzoo.models import CausalLM, Llama


class LlamaAdapter(Adapter):
    """``model.embed_tokens``, ``model.layers.i.self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
    ``input_layernorm``, ``post_attention_layernorm``, ``model.norm``, ``lm_head``."""

    model_type, hf_class, model_class = "llama", "LlamaForCausalLM", Llama
    defaults = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                    max_position_embeddings=2048, rms_norm_eps=1e-6, attention_bias=False, mlp_bias=False,
                    attention_dropout=0.0, tie_word_embeddings=False, rope_theta=10000.0)
    nullable = frozenset({"num_key_value_heads", "head_dim"})

    # ------------------------------------------------------------------ config in
    def biases(self, config: dict) -> dict:
        """llmzoo's bias arguments for a config.json (Llama: ``bias``, one switch for both HF fields)."""
        if bool(config["attention_bias"]) != bool(config["mlp_bias"]):
            raise ValueError("attention_bias != mlp_bias is not supported: llmzoo's Llama has one `bias` switch")
        return dict(bias=bool(config["attention_bias"]))

    def kwargs(self, config: dict) -> dict:
        if config["hidden_act"] != "silu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported: Llama-family models use 'silu'")
        return dict(vocab_size=config["vocab_size"], embed_dim=config["hidden_size"],
                    num_heads=config["num_attention_heads"], num_layers=config["num_hidden_layers"],
                    max_position_embeddings=config["max_position_embeddings"],
                    dropout=float(config["attention_dropout"]), num_kv_heads=config["num_key_value_heads"],
                    head_dim=config["head_dim"], ffn_dim=config["intermediate_size"],
                    norm_eps=float(config["rms_norm_eps"]), **rope_from_hf(config), **self.biases(config),
                    tie_word_embeddings=bool(config["tie_word_embeddings"]))

    # ------------------------------------------------------------------ config out
    def bias_config(self, model: CausalLM) -> dict:
        """The config.json fields of ``model``'s biases; refuses biases the transformers class cannot hold."""
        bias = bool(model.hparams.bias)
        return dict(attention_bias=bias, mlp_bias=bias)

    def refuse_bias(self, model: CausalLM, why: str) -> None:
        """Refuse to export a ``model`` with ``bias=True``: transformers' class ``why`` (has no such biases)."""
        if model.hparams.bias:
            raise ValueError(f"{type(model).__name__} with bias=True cannot be exported: transformers' "
                             f"{self.model_type} {why}")

    def config(self, model: CausalLM) -> dict:
        hp = model.hparams
        biases = self.bias_config(model)
        return dict(hidden_size=hp.embed_dim, intermediate_size=model.ffn_dim, num_hidden_layers=hp.num_layers,
                    num_attention_heads=hp.num_heads, num_key_value_heads=hp.num_kv_heads or hp.num_heads,
                    head_dim=model.head_dim, hidden_act="silu", max_position_embeddings=hp.max_position_embeddings,
                    rms_norm_eps=float(hp.norm_eps), attention_dropout=float(hp.dropout), **rope_to_hf(hp), **biases)

    # ------------------------------------------------------------------ state dict
    def rules(self, model: CausalLM, hf_keys=()) -> list[Rule]:
        rules = [Rule("embed.weight", ("model.embed_tokens.weight",)), Rule("norm.weight", ("model.norm.weight",))]
        if not model.hparams.tie_word_embeddings:
            rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
        for i, block in enumerate(model.blocks):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            rules += [Rule(ours + "attention_norm.weight", (theirs + "input_layernorm.weight",)),
                      Rule(ours + "mlp_norm.weight", (theirs + "post_attention_layernorm.weight",)),
                      *self.attention_rules(block.attention, ours + "attention.", theirs + "self_attn."),
                      *self.mlp_rules(block.mlp, ours + "mlp.", theirs, hf_keys)]
        return rules

    def attention_rules(self, attention: nn.Module, ours: str, theirs: str) -> list[Rule]:
        """Fused ``qkv`` = q_proj | k_proj | v_proj (weights, and biases where the model has them), ``out`` = o_proj."""
        q_size = attention.num_heads * attention.head_dim
        kv_size = attention.num_kv_heads * attention.head_dim
        return [*(Rule(f"{ours}qkv.{p}", tuple(f"{theirs}{n}_proj.{p}" for n in "qkv"), "concat",
                       (q_size, kv_size, kv_size)) for p in linear_params(attention.qkv)),
                *(Rule(f"{ours}out.{p}", (f"{theirs}o_proj.{p}",)) for p in linear_params(attention.out))]

    def mlp_rules(self, mlp: nn.Module, ours: str, theirs: str, hf_keys) -> list[Rule]:
        """Fused ``gate_up`` = gate_proj | up_proj, ``down`` = down_proj. ``theirs``: the layer's prefix."""
        ffn_dim = mlp.down.in_features
        return [*(Rule(f"{ours}gate_up.{p}", (f"{theirs}mlp.gate_proj.{p}", f"{theirs}mlp.up_proj.{p}"), "concat",
                       (ffn_dim, ffn_dim)) for p in linear_params(mlp.gate_up)),
                *(Rule(f"{ours}down.{p}", (f"{theirs}mlp.down_proj.{p}",)) for p in linear_params(mlp.down))]
