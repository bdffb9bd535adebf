"""Hugging Face interop: read and write checkpoint directories that transformers loads.

- :func:`from_hf` builds an llmzoo model from a Hugging Face directory (``config.json`` +
  ``model.safetensors`` or a sharded index) or from a transformers model object;
- :func:`to_hf` writes a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer`` /
  ``pipeline("text-generation")`` load offline;
- :func:`convert_hf_to_checkpoint` / :func:`convert_checkpoint_to_hf` do the same with Lightning checkpoints.

transformers is never imported here: directories are read and written with ``json`` and ``safetensors``,
and no code named by a checkpoint (``auto_map``) is ever run.

Each family is an :class:`~llmzoo.hf.adapter.Adapter` in a module of its own (``gpt``, ``llama``, ``mistral``,
...): its config mapping both ways and its state-dict :class:`~llmzoo.hf.rules.Rule` s. Every module of this
package is imported below, so a new family's adapter module registers itself by being here.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import torch

from llmzoo.checkpoints import ARCHITECTURE_KEY, qualified_name, save_checkpoint
from llmzoo.files import new_directory
from llmzoo.layers.lora import has_lora
from llmzoo.hf.adapter import (ADAPTERS, Adapter, adapter_for_config, adapter_for_model, config_from_hf,
                               config_to_hf, hf_model_type)
from llmzoo.hf.peft import from_peft, read_peft_config, to_peft
from llmzoo.hf.rules import Rule, convert_hf_state_dict, hf_state_dict, load_hf_state_dict, state_dict_rules
from llmzoo.hf.tokenizer import as_tokenizers, save_tokenizer, special_tokens
from llmzoo.hf.weights import (DEFAULT_MAX_SHARD_SIZE, as_dtype, files_dtype, load_hf_weights, model_dtype,
                               read_hf_config, save_hf_weights, write_json)
from llmzoo.models import CausalLM
from llmzoo.models.build import empty_model, fill_model, load_checkpoint_model

for _module in pkgutil.iter_modules(__path__):  # the family adapters, in the order of their file names
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ADAPTERS", "Adapter", "DEFAULT_MAX_SHARD_SIZE", "Rule", "adapter_for_config", "adapter_for_model",
           "config_from_hf", "config_to_hf", "convert_checkpoint_to_hf", "convert_hf_state_dict",
           "convert_hf_to_checkpoint", "from_hf", "from_peft", "hf_model_type", "hf_state_dict", "lightning_checkpoint",
           "load_checkpoint_model", "load_hf_state_dict", "load_hf_weights", "read_hf_config", "save_hf_weights",
           "read_peft_config", "special_tokens", "state_dict_rules", "to_hf", "to_peft"]


def from_hf(source, dtype: torch.dtype | str | None = None, allow_pickle: bool = False) -> CausalLM:
    """An llmzoo model (in eval mode) from a Hugging Face directory or a transformers model object.

    ``source``: a directory with ``config.json`` and ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``), or a ``*ForCausalLM`` object. Its ``model_type`` picks the class
    (``openai-gpt`` -> GPT, ``gpt2`` -> GPT2, ``llama``, ``mistral``, ``mixtral``, ``qwen2``, ``qwen3``). ``dtype``:
    of the weights; by default the files' own (bf16 stays bf16). ``allow_pickle``: accept ``pytorch_model.bin``
    files, read with ``weights_only=True``. transformers is not needed for a directory.
    """
    dtype = as_dtype(dtype)
    if isinstance(source, (str, os.PathLike)):
        config = read_hf_config(source)
        cls, kwargs = config_from_hf(config)
        tensors = load_hf_weights(source, allow_pickle)
        dtype = dtype or files_dtype(tensors, config)
    else:  # a transformers model object: copy its tensors, it keeps its own
        cls, kwargs = config_from_hf(source.config.to_dict())
        tensors = {name: tensor.detach().clone() for name, tensor in source.state_dict().items()}
        dtype = dtype or next(source.parameters()).dtype
    model = empty_model(cls, kwargs)
    converted = convert_hf_state_dict(model, tensors, pop=True)
    return fill_model(model, {name: t.to(dtype).contiguous() for name, t in converted.items()}).eval()


def _model_directory(directory: Path) -> bool:
    """Whether ``directory`` may be replaced by an export: it is a model directory (holds ``config.json``)."""
    if not (directory / "config.json").is_file():
        raise FileExistsError(f"{directory} is not empty and holds no config.json: refusing to replace a "
                              f"directory that is not a model directory")
    return True


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
    if has_lora(model):
        raise ValueError(f"{type(model).__name__} has LoRA adapters: export them with to_peft, or merge them into the "
                         f"weights first (llmzoo.lora.merge_lora; llmzoo convert --to_hf does) to export the whole model")
    dtype = as_dtype(dtype) or model_dtype(model)
    config = config_to_hf(model, dtype)
    ids = {}
    if tokenizer is not None:
        tokenizer, roles = as_tokenizers(tokenizer)
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
    with new_directory(directory, overwrite, replaceable=_model_directory) as temporary:
        write_json(temporary / "config.json", config)
        write_json(temporary / "generation_config.json", {k: v for k, v in ids.items() if v is not None})
        save_hf_weights(tensors, temporary, max_shard_size)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tokens, temporary, model.hparams.max_position_embeddings)
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
    save_checkpoint(checkpoint, ckpt_path)
    return ckpt_path


def convert_checkpoint_to_hf(ckpt_path: str | os.PathLike, hf_dir: str | os.PathLike, tokenizer=None,
                             model_class: str | type[CausalLM] | None = None, **to_hf_kwargs) -> Path:
    """Lightning checkpoint -> Hugging Face directory (see :func:`load_checkpoint_model` and :func:`to_hf`,
    whose keyword arguments ``dtype``, ``max_shard_size``, ``overwrite`` and the special tokens apply)."""
    return to_hf(load_checkpoint_model(ckpt_path, model_class), hf_dir, tokenizer, **to_hf_kwargs)
