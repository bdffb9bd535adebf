"""GPT-1 (``openai-gpt``) and GPT-2 (``gpt2``): learned positions, LayerNorm, GELU (tanh), Conv1D layers."""

from __future__ import annotations

from llmzoo.hf.adapter import Adapter
from llmzoo.hf.rules import Rule
from llmzoo.models import GPT, GPT2, CausalLM

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # transformers' names for GELU (tanh)
_BLOCK = [("attention.qkv", "attn.c_attn"), ("attention.out", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
          ("mlp.down", "mlp.c_proj"), ("attention_norm", "ln_1"), ("mlp_norm", "ln_2")]


class GPTAdapter(Adapter):
    """GPT-1: post-LN blocks, no final norm, the MLP 4 x ``n_embd`` wide, ``afn="gelu"`` (the tanh approximation)."""

    model_type, hf_class, model_class = "openai-gpt", "OpenAIGPTLMHeadModel", GPT
    defaults = dict(vocab_size=40478, n_positions=512, n_embd=768, n_layer=12, n_head=12, afn="gelu",
                    resid_pdrop=0.1, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    embeddings = ("tokens_embed", "positions_embed")  # HF names of the token and position embeddings
    final_norm: str | None = None  # HF name of the final LayerNorm

    def check(self, config: dict) -> None:
        """Refuse the config.json fields that llmzoo's class does not implement."""
        if config["afn"] != "gelu":
            raise ValueError(f"openai-gpt with afn {config['afn']!r} is not supported: llmzoo's GPT uses 'gelu' "
                             f"(the tanh approximation in transformers)")

    def kwargs(self, config: dict) -> dict:
        self.check(config)
        return dict(vocab_size=config["vocab_size"], embed_dim=config["n_embd"], num_heads=config["n_head"],
                    num_layers=config["n_layer"], max_position_embeddings=config["n_positions"],
                    dropout=float(config["resid_pdrop"]), ffn_dim=config.get("n_inner"),
                    norm_eps=float(config["layer_norm_epsilon"]), tie_word_embeddings=bool(config["tie_word_embeddings"]))

    def mlp_config(self, model: CausalLM) -> dict:
        """The config.json fields of the MLP (its width and activation)."""
        hp = model.hparams
        if hp.ffn_dim not in (None, 4 * hp.embed_dim):
            raise ValueError(f"GPT with ffn_dim={hp.ffn_dim} cannot be exported: openai-gpt's MLP is 4 * embed_dim "
                             f"= {4 * hp.embed_dim} wide (use GPT2, whose n_inner is free)")
        return dict(afn="gelu")

    def config(self, model: CausalLM) -> dict:
        hp = model.hparams
        if model.activation != "gelu_tanh":
            raise ValueError(f"{type(model).__name__} with activation {model.activation!r} cannot be exported: "
                             f"transformers' {self.model_type} uses GELU (tanh)")
        dropout = float(hp.dropout)
        return dict(n_positions=hp.max_position_embeddings, n_embd=hp.embed_dim, n_layer=hp.num_layers,
                    n_head=hp.num_heads, layer_norm_epsilon=float(hp.norm_eps), resid_pdrop=dropout,
                    embd_pdrop=dropout, attn_pdrop=dropout, **self.mlp_config(model))

    def rules(self, model: CausalLM, hf_keys=()) -> list[Rule]:
        """``transformer.`` names (left out by files that omit the prefix, as the hub's original GPT-2);
        Conv1D weights are stored ``[in, out]``."""
        prefix = "" if hf_keys and not any(k.startswith("transformer.") for k in hf_keys) else "transformer."
        tokens, positions = self.embeddings
        rules = [Rule("embed.weight", (f"{prefix}{tokens}.weight",)),
                 Rule("positions.weight", (f"{prefix}{positions}.weight",))]
        if self.final_norm:
            rules += [Rule(f"norm.{p}", (f"{prefix}{self.final_norm}.{p}",)) for p in ("weight", "bias")]
        if not model.hparams.tie_word_embeddings:
            rules.append(Rule("lm_head.weight", ("lm_head.weight",)))
        for i in range(len(model.blocks)):
            for ours, theirs in _BLOCK:
                linear = not ours.endswith("norm")
                rules.append(Rule(f"blocks.{i}.{ours}.weight", (f"{prefix}h.{i}.{theirs}.weight",),
                                  "transpose" if linear else "copy"))
                rules.append(Rule(f"blocks.{i}.{ours}.bias", (f"{prefix}h.{i}.{theirs}.bias",)))
        return rules


class GPT2Adapter(GPTAdapter):
    """GPT-2: GPT-1's layers, pre-LN with a final ``ln_f``, the MLP width free (``n_inner``)."""

    model_type, hf_class, model_class = "gpt2", "GPT2LMHeadModel", GPT2
    defaults = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                    activation_function="gelu_new", resid_pdrop=0.1, layer_norm_epsilon=1e-5, scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, add_cross_attention=False, tie_word_embeddings=True)
    nullable = frozenset({"n_inner"})
    embeddings, final_norm = ("wte", "wpe"), "ln_f"

    def check(self, config: dict) -> None:
        if config["activation_function"] not in TANH_GELUS:
            raise ValueError(f"gpt2 with activation_function {config['activation_function']!r} is not supported: "
                             f"llmzoo's GPT2 uses GELU (tanh), one of {', '.join(TANH_GELUS)}")
        for key, expected in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                              ("add_cross_attention", False)):
            if bool(config[key]) != expected:
                raise ValueError(f"gpt2 with {key}={config[key]} is not supported: llmzoo's GPT2 needs {key}={expected}")

    def mlp_config(self, model: CausalLM) -> dict:
        return dict(n_inner=model.hparams.ffn_dim, activation_function="gelu_new", scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
