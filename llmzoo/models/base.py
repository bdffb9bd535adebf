"""The shared LightningModule of every architecture: a decoder-only causal language model."""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from functools import partial

import lightning as L
import torch
from torch import Tensor, nn

from llmzoo.checkpoints import ARCHITECTURE_KEY, QUANTIZATION_KEY, qualified_name, read_checkpoint
from llmzoo.layers import Block, CausalSelfAttention, LearnedPositions, MoE, RotaryEmbedding
from llmzoo.layers.lora import LoRASettings, adapters_disabled, add_lora, has_lora, head_weight
from llmzoo.layers.loss import IGNORE_INDEX, linear_cross_entropy
from llmzoo.layers.preference import (PreferenceSettings, check_settings as check_preference, completion_logps,
                                      preference_loss, preference_metrics)
from llmzoo.layers.quantized import Int4Weight, Int8Weight
from llmzoo.models.hparams import check_hyperparameters
from llmzoo.models.metrics import BitsPerByte, TokenNLL, TokenPerplexity


NO_PREFERENCE_DATA = ("preference settings (--model.preference) need preference data: --data PreferenceDataModule "
                      "(see configs/dpo.yaml), or leave --model.preference out")


class CausalLM(L.LightningModule):
    """Decoder-only causal LM: token embedding (+ absolute positions) -> blocks -> final norm -> lm_head.

    An architecture subclasses this and picks its layers by overriding the ``make_*`` hooks
    (``make_attention``, ``make_mlp``, ``make_norm``, optionally ``make_positions``, ``make_rope``,
    ``make_block``) and the class attributes ``prenorm`` and ``embed_scale``. Pre-norm models get a
    final norm before the head; post-norm models end normalised already.

    Training batches are token windows ``[B, T + 1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``) or
    dicts with ``input_ids`` and optional ``labels`` (-100 = ignore) and ``attention_mask``. A validation or
    test batch with ``num_bytes`` (the UTF-8 bytes its targets spell) also logs bits per byte (``val/bpb``).
    With ``preference`` settings, batches are preference batches (:class:`~llmzoo.data.PreferenceDataModule`'s) and
    the objective is DPO, IPO or SimPO (:meth:`preference_step`).

    Args:
        vocab_size: size of the token vocabulary (linked from the tokenizer by the CLI).
        embed_dim: width of the residual stream.
        num_heads: attention (query) heads.
        num_layers: decoder blocks.
        max_position_embeddings: longest sequence (context length) the model accepts.
        dropout: dropout on embeddings, attention weights and residual branches.
        tie_word_embeddings: share the token embedding with the output head.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay, applied to weight matrices only (not norms, biases, embeddings).
        betas: AdamW betas.
        warmup_steps: steps of linear learning-rate warmup.
        lr_decay_steps: step at which the cosine decay reaches ``min_learning_rate``; defaults to the
            trainer's ``max_steps`` (constant after warmup when neither is set).
        min_learning_rate: end of the cosine decay; defaults to ``learning_rate / 10``.
        aux_loss_coef: weight of the load-balancing loss of mixture-of-experts layers added to the training
            loss (no effect on dense models).
        activation_checkpointing: recompute each block's activations in the backward pass instead of
            storing them (less memory, about a third more compute).
        compile: compile each block with ``torch.compile`` when training starts (``configure_model``).
        pretrained: the checkpoint file or Hugging Face directory a fine-tuning run starts from (its architecture,
            hyperparameters, weights and tokenizer); recorded here, read by ``llmzoo fit`` when the run starts
            (:func:`llmzoo.pretrained.load_pretrained`), not by this class.
        lora: LoRA adapters (:class:`~llmzoo.layers.lora.LoRASettings`: ``r``, ``alpha``, ``dropout``, ``targets``)
            put on the model as it is built; every other weight is frozen (see docs/finetuning.md).
        quantize: ``int8`` or ``int4`` (groups of 32): the frozen base weights but the output head are quantized when
            training starts (``configure_model``) and only the LoRA adapters train, QLoRA-style (docs/inference.md).
        preference: preference tuning (:class:`~llmzoo.layers.preference.PreferenceSettings`: ``loss_type``, ``beta``,
            ``label_smoothing``, ``gamma``, ``reference``) on the pairs of a ``PreferenceDataModule`` instead of the
            next-token loss (see docs/finetuning.md).
    """

    prenorm: bool = True
    embed_scale: float = 1.0
    registry: dict[str, type[CausalLM]] = {}  # every subclass, by "module.QualName" (what checkpoints record)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CausalLM.registry[qualified_name(cls)] = cls

    def __init__(self, vocab_size: int, embed_dim: int, num_heads: int, num_layers: int,
                 max_position_embeddings: int, dropout: float = 0.0, tie_word_embeddings: bool = False, *,
                 learning_rate: float = 3e-4, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 100, lr_decay_steps: int | None = None,
                 min_learning_rate: float | None = None, aux_loss_coef: float = 0.01,
                 activation_checkpointing: bool = False, compile: bool = False, pretrained: str | None = None,
                 lora: LoRASettings | None = None, quantize: str | None = None,
                 preference: PreferenceSettings | None = None):
        super().__init__()
        self.save_hyperparameters()  # also records the subclasses' arguments: Llama.load_from_checkpoint(p) works
        check_hyperparameters(self.hparams)
        if quantize is not None:
            from llmzoo.quantize import check_options

            check_options(quantize, 32)
        if preference is not None:
            settings = PreferenceSettings(**preference) if isinstance(preference, dict) else preference
            self.hparams.preference = asdict(check_preference(settings))  # a plain dict, as lora's
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.positions = self.make_positions()
        self.rope = self.make_rope()
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(self.make_block(layer) for layer in range(num_layers))
        self.norm = self.make_norm() if self.prenorm else nn.Identity()
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False)
        self.init_weights()
        if tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.eval_nll, self.eval_ppl, self.eval_bpb = TokenNLL(), TokenPerplexity(), BitsPerByte()
        if lora is not None:
            settings = LoRASettings(**lora) if isinstance(lora, dict) else lora
            self.hparams.lora = asdict(settings)  # a plain dict: checkpoints load with weights_only=True
            add_lora(self, **self.hparams.lora)

    # ----------------------------------------------------------------- architecture hooks
    def make_positions(self) -> nn.Module | None:
        """Absolute position embedding added to the token embedding (``positions [B, T] -> [B, T, D]``)."""
        return None

    def make_rope(self) -> RotaryEmbedding | None:
        """Rotary embedding applied to queries and keys inside attention."""
        return None

    def make_attention(self, layer: int) -> CausalSelfAttention:
        raise NotImplementedError

    def make_mlp(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def make_norm(self) -> nn.Module:
        raise NotImplementedError

    def make_block(self, layer: int) -> Block:
        return Block(self.make_attention(layer), self.make_mlp(layer), self.make_norm(), self.make_norm(),
                     prenorm=self.prenorm, dropout=self.hparams.dropout)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Every layer that has an ``init_weights(std, residual_std)`` initialises itself (the shared layers scale
        the projections writing into the residual stream by ``residual_std = std / sqrt(2 * layers)``, GPT-2's
        rule); any other ``nn.Linear`` or ``nn.Embedding`` gets Normal(0, std) weights and zero biases."""
        residual_std = std / math.sqrt(2 * len(self.blocks))
        done: set[nn.Module] = set()
        for module in self.modules():
            if module is self or module in done:
                continue
            if callable(getattr(module, "init_weights", None)):
                module.init_weights(std, residual_std)
                done.update(module.modules())
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids [B, T]`` -> logits ``[B, T, vocab_size]``.

        ``attention_mask [B, S]`` (1 = token, 0 = padding) covers every slot so far: ``S = T`` without
        a KV cache, ``S = cached + T`` with one. Positions count real tokens only, so left-padded rows
        see the same positions as unpadded ones.
        """
        hidden, _ = self.backbone(input_ids, attention_mask)
        return self.lm_head(hidden)

    def backbone(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 input_pos: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Final hidden states ``[B, T, D]`` and the mean MoE load-balancing loss (None for dense models).

        ``input_pos [T]``: the static-shape path of a compiled decode step. ``input_ids`` go to the KV cache at
        the slots ``input_pos`` and attend over the whole preallocated cache under one mask per forward
        (:meth:`~llmzoo.layers.KVCache.mask`); ``attention_mask [B, max_length]`` then covers every slot of the
        cache. No shape depends on the position, nothing is read back to the host, and ``kv_cache_length`` is
        left to the caller to set."""
        batch, length = input_ids.shape
        static = {}
        if input_pos is not None:
            positions = input_pos[None] if attention_mask is None else self.position_ids(0, None, attention_mask,
                                                                                        input_ids.device)[:, input_pos]
            static = {"input_pos": input_pos}
        else:
            start = self.kv_cache_length
            if start + length > self.hparams.max_position_embeddings:
                raise ValueError(f"{start + length} tokens exceed max_position_embeddings="
                                 f"{self.hparams.max_position_embeddings}: shorten the input or use a longer-context "
                                 f"model")
            if attention_mask is not None and attention_mask.shape != (batch, start + length):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                 f"{(batch, start + length)} (batch, cached + new tokens)")
            positions = self.position_ids(start, length, attention_mask, input_ids.device)
        x = self.embed(input_ids)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.positions is not None:
            x = x + self.positions(positions)
        x = self.drop(x)
        rope = self.rope(positions, x.dtype) if self.rope is not None else None
        checkpointing = self.hparams.activation_checkpointing and self.training and torch.is_grad_enabled()
        aux_losses, masks = [], {}
        for block in self.blocks:
            if static:  # one mask per cache geometry (one for every zoo model), not one per layer
                cache = block.attention.kv_cache
                key = (cache.size, cache.window)
                if key not in masks:
                    masks[key] = cache.mask(input_pos, attention_mask)
                static["attn_mask"] = masks[key]
            if checkpointing:
                x, aux_loss = torch.utils.checkpoint.checkpoint(block, x, rope, attention_mask, use_reentrant=False)
            else:
                x, aux_loss = block(x, rope, attention_mask, **static)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        return self.norm(x), torch.stack(aux_losses).mean() if aux_losses else None

    @staticmethod
    def position_ids(start: int, length: int | None, attention_mask: Tensor | None, device: torch.device) -> Tensor:
        """Positions ``[B or 1, length]`` of the slots ``start .. start + length`` (None: to the end of
        ``attention_mask``); padding does not count."""
        if attention_mask is None:
            return torch.arange(start, start + length, device=device)[None]
        end = None if length is None else start + length
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:end]

    # ----------------------------------------------------------------- KV cache
    def setup_kv_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None, max_rollback: int = 0) -> None:
        """Preallocate every layer's KV cache for ``max_length`` slots (forward calls then append to it);
        ``max_rollback``: how many slots :meth:`truncate_kv_cache` may take back at once."""
        dtype, device = dtype or self.embed.weight.dtype, device or self.embed.weight.device  # the activations'
        for block in self.blocks:
            block.attention.setup_kv_cache(batch_size, max_length, dtype, device, max_rollback)

    def clear_kv_cache(self) -> None:
        for block in self.blocks:
            block.attention.kv_cache = None

    def truncate_kv_cache(self, length: int) -> None:
        """Forget the cached slots from ``length`` on (rejected draft tokens of speculative decoding)."""
        for block in self.blocks:
            block.attention.kv_cache.truncate(length)

    def reorder_kv_cache(self, rows: Tensor) -> None:
        """Row ``i`` of every cache becomes a copy of row ``rows[i]`` (``rows [B]``, beam search)."""
        for block in self.blocks:
            block.attention.kv_cache.reorder(rows)

    @property
    def kv_cache_length(self) -> int:
        """Slots held by the KV cache (0 without one); set it after static-shape steps (``backbone(input_pos=)``)."""
        cache = self.blocks[0].attention.kv_cache
        return 0 if cache is None else cache.length

    @kv_cache_length.setter
    def kv_cache_length(self, length: int) -> None:
        for block in self.blocks:
            block.attention.kv_cache.length = length

    # ----------------------------------------------------------------- generation
    def generate(self, input_ids: Tensor, max_new_tokens: int | None = None, **kwargs) -> Tensor:
        """Continue ``input_ids [B, T]``; returns ``[B, T + new]``. See :func:`llmzoo.generation.generate`."""
        from llmzoo.generation import generate

        if max_new_tokens is not None:
            kwargs["max_new_tokens"] = max_new_tokens
        return generate(self, input_ids, **kwargs)

    # ----------------------------------------------------------------- training
    def configure_model(self) -> None:
        """Called by Lightning before training: with ``quantize``, quantize the frozen base weights
        (:func:`llmzoo.quantize.quantize`, adapters kept); with ``compile``, compile each block in place (state-dict
        names stay); under a ``ModelParallelStrategy`` (FSDP2) shard the model with
        :func:`llmzoo.strategies.shard_model`. Idempotent."""
        if getattr(self, "_configured", False):
            return
        if self.hparams.quantize and not getattr(self, "quantization", None):
            from llmzoo.quantize import quantize

            quantize(self, self.hparams.quantize, group_size=32, head=False)  # the fused loss takes a float head
        if self.hparams.compile:
            for block in self.blocks:
                block.compile()
        if self.device_mesh is not None:
            from llmzoo.strategies import shard_model

            shard_model(self, self.device_mesh)
        self._configured = True

    @staticmethod
    def split_batch(batch: Tensor | dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(input_ids, targets, attention_mask)`` from a window tensor or an HF-style dict."""
        if isinstance(batch, Tensor):
            return batch[:, :-1], batch[:, 1:], None
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        targets = batch.get("labels", input_ids)[:, 1:]
        if mask is None:
            return input_ids[:, :-1], targets, None
        return input_ids[:, :-1], targets.masked_fill(mask[:, 1:] == 0, IGNORE_INDEX), mask[:, :-1]

    def token_nll(self, batch: Tensor | dict, reduction: str = "mean") -> tuple[Tensor, Tensor, Tensor | None]:
        """Next-token cross-entropy (``reduction`` over non-ignored tokens), their count, the MoE aux loss.

        The output projection is fused into the loss (:func:`~llmzoo.layers.loss.linear_cross_entropy`):
        ``[B*T, vocab]`` logits are never materialised."""
        input_ids, targets, mask = self.split_batch(batch)
        hidden, aux_loss = self.backbone(input_ids, mask)
        nll = linear_cross_entropy(hidden.flatten(0, 1), head_weight(self.lm_head), targets.flatten(), reduction)
        return nll, (targets != IGNORE_INDEX).sum(), aux_loss

    def training_step(self, batch: Tensor | dict, batch_idx: int) -> Tensor:
        if self.preference_settings is not None:
            return self.preference_step(batch, "train")
        loss, _, aux_loss = self.token_nll(batch)
        self.log("train/loss", loss, prog_bar=True)
        if aux_loss is not None:
            self.log("train/aux_loss", aux_loss)
            loss = loss + self.hparams.aux_loss_coef * aux_loss
        return loss

    def validation_step(self, batch: Tensor | dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Tensor | dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Tensor | dict, batch_idx: int) -> Tensor:
        """Negative log-likelihood of every target token ``[B, T]`` (0 where ignored)."""
        input_ids, targets, mask = self.split_batch(batch)
        logits = self(input_ids, mask)
        nll = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none",
                                          ignore_index=IGNORE_INDEX)
        return nll.view(targets.shape)

    def _evaluate(self, batch: Tensor | dict, stage: str) -> None:
        if self.preference_settings is not None:
            self.preference_step(batch, stage)
            return
        nll_sum, count, _ = self.token_nll(batch, reduction="sum")
        self.eval_nll.update(nll_sum, count)
        self.eval_ppl.update(nll_sum, count)
        self.log(f"{stage}/loss", self.eval_nll, prog_bar=True)
        self.log(f"{stage}/ppl", self.eval_ppl, prog_bar=True)
        if isinstance(batch, dict) and "num_bytes" in batch:  # the UTF-8 bytes of the targets (the datamodule's)
            self.eval_bpb.update(nll_sum, batch["num_bytes"])
            self.log(f"{stage}/bpb", self.eval_bpb, prog_bar=True)

    # ----------------------------------------------------------------- preference tuning
    @property
    def preference_settings(self) -> PreferenceSettings | None:
        settings = self.hparams.get("preference")
        return None if settings is None else PreferenceSettings(**settings)

    def completion_logps(self, batch: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """The summed log-probabilities of each row's completion tokens ``[N]`` (the tokens labelled, not -100),
        their number ``[N]`` and the MoE aux loss (:func:`~llmzoo.layers.preference.completion_logps`)."""
        input_ids, targets, mask = self.split_batch(batch)
        hidden, aux_loss = self.backbone(input_ids, mask)
        logps, tokens = completion_logps(hidden, head_weight(self.lm_head), targets)
        return logps, tokens, aux_loss

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> Tensor:
        """The reference's summed completion log-probabilities of a preference batch ``[2, B]`` (chosen, rejected),
        without gradients and without dropout: the frozen copy when there is one (``reference: model`` without LoRA),
        else these weights with the LoRA adapters switched off (no copy; without LoRA: this model as it is, which is
        the reference only before training, when ``precomputed`` ones are made)."""
        model = self.__dict__.get("reference_model", self)  # not a submodule: not trained, saved or moved by Lightning
        training = self.training
        self.eval()
        try:
            with adapters_disabled(self):
                logps = model.completion_logps(batch)[0]
        finally:
            self.train(training)
        return logps.view(2, -1)

    def frozen_copy(self) -> CausalLM:
        """The starting weights in a model of their own, frozen, in eval mode: read from ``pretrained`` (a resumed
        run's weights have moved on), else copied from this model before its first step."""
        from llmzoo.models.build import empty_model, fill_model

        if self.hparams.pretrained:
            from llmzoo.pretrained import load_pretrained

            copy = load_pretrained(self.hparams.pretrained, model_class=self.architecture)
        elif self.starting_weights():
            kwargs = {k: v for k, v in self.hparams.items() if k not in ("lora", "preference", "quantize")}
            copy = fill_model(empty_model(self.architecture, kwargs), {k: v.detach().clone()
                                                                       for k, v in self.state_dict().items()})
        else:
            raise ValueError("reference=model without LoRA needs the starting weights, which a restored checkpoint's "
                             "are not: give --model.pretrained (the frozen copy is read from it) or use "
                             "--model.preference.reference precomputed")
        return copy.to(device=self.device, dtype=self.embed.weight.dtype).eval().requires_grad_(False)

    def starting_weights(self) -> bool:
        """Whether these weights are those training starts from: its trainer has restored no checkpoint
        (``--ckpt_path``) and taken no step."""
        trainer = self._trainer
        return trainer is None or (trainer.ckpt_path is None and trainer.global_step == 0)

    def on_fit_start(self) -> None:
        """Preference tuning's reference, before the first step: a frozen copy of the starting weights
        (``reference: model`` without LoRA; with LoRA the adapters are switched off instead), or the reference
        log-probabilities of every pair, computed once by the starting model and kept by the datamodule, which saves
        them in the checkpoints (``precomputed``: a resumed run has them already)."""
        settings = self.preference_settings
        if settings is None or settings.loss_type == "simpo":
            return
        if settings.reference == "model":
            self.keep_frozen_copy()
            return
        precompute = getattr(self.trainer.datamodule, "precompute_reference", None)
        if precompute is None:
            raise ValueError(NO_PREFERENCE_DATA)
        with self.trainer.precision_plugin.forward_context():  # as the policy's steps: bf16-mixed's autocast
            precompute(lambda batch: self.reference_logps(self.transfer_batch_to_device(batch, self.device, 0)))

    def keep_frozen_copy(self) -> None:
        """``reference: model`` without LoRA: the frozen copy of the starting weights, made once (by fit, or by
        ``llmzoo validate`` / ``test``, which do not start with ``on_fit_start``)."""
        settings = self.preference_settings
        if (settings is not None and settings.loss_type != "simpo" and settings.reference == "model"
                and not has_lora(self) and "reference_model" not in self.__dict__):
            self.__dict__["reference_model"] = self.frozen_copy()

    on_validation_start = on_test_start = keep_frozen_copy

    def preference_step(self, batch: dict, stage: str) -> Tensor:
        """The preference loss of a batch of ``B`` pairs (``input_ids`` ``[2B, L]``: the chosen completions, then
        the rejected ones, labels -100 but on the completions; ``reference_logps [2, B]`` when precomputed), chosen
        and rejected through the model in one forward; logs the loss and the rewards under ``stage/``."""
        settings = self.preference_settings
        if not isinstance(batch, dict) or "pair_index" not in batch:
            raise ValueError(NO_PREFERENCE_DATA)
        logps, tokens, aux_loss = self.completion_logps(batch)
        policy, tokens = logps.view(2, -1), tokens.view(2, -1)
        reference = None
        if settings.loss_type != "simpo":
            reference = batch.get("reference_logps") if settings.reference == "precomputed" else None
            if reference is None:  # validate / test before training, or LoRA: this model, adapters off, is it
                if settings.reference == "precomputed" and not (has_lora(self) or self.starting_weights()):
                    raise ValueError("the preference batch has no precomputed reference log-probabilities and these "
                                     "weights are not the starting ones (a restored checkpoint's): give the data of "
                                     "the run, whose checkpoint keeps them, or --model.preference.reference model")
                reference = self.reference_logps(batch)
        losses, chosen, rejected = preference_loss(policy, reference, tokens, settings)
        metrics = preference_metrics(losses, chosen, rejected, policy)
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("loss", "rewards/accuracies", "rewards/margins"),
                     batch_size=policy.shape[1], sync_dist=stage != "train")
        loss = metrics["loss"]
        if aux_loss is not None and stage == "train":
            self.log("train/aux_loss", aux_loss)
            loss = loss + self.hparams.aux_loss_coef * aux_loss
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 and id(param) not in embeddings else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.learning_rate, betas=tuple(hp.betas))
        decay_steps = hp.lr_decay_steps or (self.trainer.max_steps if self.trainer.max_steps > 0 else None)
        min_ratio = (hp.min_learning_rate if hp.min_learning_rate is not None else hp.learning_rate / 10) / hp.learning_rate
        schedule = partial(warmup_cosine, warmup_steps=hp.warmup_steps, decay_steps=decay_steps, min_ratio=min_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[ARCHITECTURE_KEY] = qualified_name(self.architecture)
        if getattr(self, "quantization", None):  # its state dict holds quantized weights (llmzoo.quantize)
            checkpoint[QUANTIZATION_KEY] = self.quantization

    @property
    def architecture(self) -> type[CausalLM]:
        """The model's class: the nearest registered one (a distribution wrapper such as FSDP2's ``FSDPLlama``
        unregisters the subclass it makes, see :func:`llmzoo.strategies.shard_model`)."""
        return next(cls for cls in type(self).__mro__ if CausalLM.registry.get(qualified_name(cls)) is cls)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None,
                             weights_only: bool | None = True, **kwargs):
        """Lightning's ``load_from_checkpoint``, reading with ``weights_only=True`` and refusing a checkpoint
        of another architecture. ``CausalLM.load_from_checkpoint(path)`` builds whichever one it holds."""
        readable = isinstance(checkpoint_path, (str, os.PathLike))  # else a file object: Lightning reads it as is
        stored = checkpoint_architecture(read_checkpoint(checkpoint_path)) if readable else None  # refuses shards
        target = stored if cls is CausalLM else cls
        if stored is not None and stored is not target:
            raise ValueError(f"{checkpoint_path} holds a {stored.__name__} model, not a {cls.__name__}: load it with "
                             f"{stored.__name__}.load_from_checkpoint or CausalLM.load_from_checkpoint")
        if target is None:
            raise ValueError(f"{checkpoint_path} records no llmzoo architecture: load it with the model's own class")
        return super(CausalLM, target).load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict,
                                                            weights_only=weights_only, **kwargs)

    # ----------------------------------------------------------------- introspection
    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (quantized weights included); ``non_embedding`` leaves out the token and learned position
        embeddings."""
        total = sum(p.numel() for p in self.parameters())
        total += sum(m.shape.numel() for m in self.modules() if isinstance(m, (Int8Weight, Int4Weight)))
        if non_embedding:
            total -= self.embed.weight.numel()
            if isinstance(self.positions, LearnedPositions):
                total -= self.positions.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context ``seq_len``, PaLM's ``6 N + 12 L H Dh T``:
        ``N`` counts the weights of every matrix multiply a token goes through (the output head; for
        MoE the router and the ``k`` active experts; not the embedding lookups), ``T`` is the number of
        keys a query sees (capped by a sliding window)."""
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))  # routers, head too
        experts = sum((m.gate_up.numel() + m.down.numel()) * m.experts_per_token // m.num_experts
                      for m in self.modules() if isinstance(m, MoE))
        attention = 0
        for block in self.blocks:
            window = block.attention.sliding_window
            keys = min(seq_len, window) if window else seq_len
            attention += 12 * block.attention.num_heads * block.attention.head_dim * keys
        return 6 * (linear + experts) + attention

    def memory_footprint(self) -> dict[str, int]:
        """Bytes the weights take in fp32, bf16 and int8, and ``held``: as they are held now, quantized weights
        (:mod:`llmzoo.quantize`) with their scales and zeros (no activations, gradients or optimizer state)."""
        n = self.num_parameters()
        quantized = [m for m in self.modules() if isinstance(m, (Int8Weight, Int4Weight))]
        held = sum(p.nbytes for p in self.parameters()) + sum(b.nbytes for m in quantized for b in m.buffers())
        return {"fp32": 4 * n, "bf16": 2 * n, "int8": n, "held": held}


def checkpoint_architecture(checkpoint: str | os.PathLike | dict) -> type[CausalLM] | None:
    """The llmzoo class a checkpoint (a path, or the dict :func:`~llmzoo.checkpoints.read_checkpoint` returned)
    was saved from; None if it records none (or for a file object, which Lightning reads as it is)."""
    if not isinstance(checkpoint, (str, os.PathLike, dict)):
        return None
    name = (checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint, weights=False)).get(ARCHITECTURE_KEY)
    if name is None:
        return None
    if name not in CausalLM.registry:
        raise ValueError(f"{checkpoint if not isinstance(checkpoint, dict) else 'the checkpoint'} holds a {name} "
                         f"model, a class not imported in this process: import its module first (on the command line: "
                         f"llmzoo --import MODULE ...)")
    return CausalLM.registry[name]


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int | None, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine down to ``min_ratio`` at ``decay_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay_steps is None:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)
