"""Mixtral (``mixtral``): Mistral's adapter plus the experts. Files on disk hold them one by one
(``block_sparse_moe.experts.e.w1``); transformers 5 holds them fused in memory (``mlp.experts.gate_up_proj``):
both are read, the per-expert layout is written."""

from __future__ import annotations

import warnings

from torch import nn

from llmzoo.hf.mistral import MistralAdapter
from llmzoo.hf.rules import Rule
from llmzoo.models import CausalLM, Mixtral


class MixtralAdapter(MistralAdapter):
    model_type, hf_class, model_class = "mixtral", "MixtralForCausalLM", Mixtral
    defaults = dict(MistralAdapter.defaults, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None,
                    num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001, router_jitter_noise=0.0)

    def kwargs(self, config: dict) -> dict:
        if config["router_jitter_noise"]:
            warnings.warn(f"router_jitter_noise={config['router_jitter_noise']} is ignored: llmzoo's router adds "
                          f"no training noise (inference is unaffected)", stacklevel=5)
        return dict(super().kwargs(config), num_experts=config["num_local_experts"],
                    experts_per_token=config["num_experts_per_tok"], aux_loss_coef=float(config["router_aux_loss_coef"]))

    def config(self, model: CausalLM) -> dict:
        hp = model.hparams
        return dict(super().config(model), num_local_experts=hp.num_experts, num_experts_per_tok=hp.experts_per_token,
                    router_aux_loss_coef=float(hp.aux_loss_coef), router_jitter_noise=0.0, output_router_logits=False)

    def mlp_rules(self, mlp: nn.Module, ours: str, theirs: str, hf_keys) -> list[Rule]:
        """Router = ``gate``; experts fused (``mlp.experts.gate_up_proj [E, 2F, D]``, ``down_proj``) where the state
        dict being read holds them so, else one by one (``w1 | w3`` of an expert = its rows of ``gate_up``)."""
        if f"{theirs}mlp.experts.gate_up_proj" in hf_keys:
            return [Rule(ours + "router.weight", (theirs + "mlp.gate.weight",)),
                    Rule(ours + "gate_up", (theirs + "mlp.experts.gate_up_proj",)),
                    Rule(ours + "down", (theirs + "mlp.experts.down_proj",))]
        moe, experts = theirs + "block_sparse_moe.", range(mlp.gate_up.shape[0])
        return [Rule(ours + "router.weight", (moe + "gate.weight",)),
                Rule(ours + "gate_up", tuple(f"{moe}experts.{e}.{w}.weight" for e in experts for w in ("w1", "w3")),
                     "experts", group=2),
                Rule(ours + "down", tuple(f"{moe}experts.{e}.w2.weight" for e in experts), "experts")]
