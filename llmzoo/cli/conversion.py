"""``llmzoo convert``: Hugging Face directories, Lightning checkpoints and sharded checkpoints, one into another.
It needs no model, data or Trainer, so :func:`~llmzoo.cli.main` runs it before LightningCLI starts."""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser

from llmzoo.checkpoints import is_sharded_checkpoint, read_checkpoint, save_checkpoint
from llmzoo.data import load_tokenizer_for_checkpoint
from llmzoo.hf import DEFAULT_MAX_SHARD_SIZE, convert_hf_to_checkpoint, lightning_checkpoint
from llmzoo.hf import from_hf as from_hf_model
from llmzoo.hf import from_peft as from_peft_directory
from llmzoo.hf import to_peft as to_peft_directory
from llmzoo.data.chat import stored_template
from llmzoo.files import write_atomic
from llmzoo.layers.lora import has_lora, merge_lora
from llmzoo.hf import to_hf as write_hf
from llmzoo.models.build import load_checkpoint_model
from llmzoo.onnx import export_onnx
from llmzoo.quantize import check_options, quantize_checkpoint
from llmzoo.strategies import consolidate_checkpoint


def convert(from_hf: str | None = None, to: str | None = None, ckpt_path: str | None = None,
            to_hf: str | None = None, dtype: str | None = None, allow_pickle: bool = False,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
            tokenizer: str | None = None, model_class: str | None = None, quantize: str | None = None,
            group_size: int = 32, to_onnx: str | None = None, to_peft: str | None = None,
            from_peft: str | None = None) -> Path:
    """Convert a Hugging Face directory to a Lightning checkpoint, a checkpoint to a Hugging Face directory, or a
    sharded checkpoint to one file.

    ``--from_hf DIR --to CKPT``, ``--ckpt_path CKPT --to_hf DIR`` (see docs/interop.md),
    ``--ckpt_path SHARDED_DIR --to CKPT`` (see docs/distributed.md), ``--ckpt_path CKPT --quantize int8 --to CKPT``
    or ``--ckpt_path CKPT --to_onnx DIR`` (see docs/inference.md); a LoRA run: ``--ckpt_path CKPT --to_peft DIR``,
    ``--from_peft DIR`` onto ``--ckpt_path CKPT`` or ``--from_hf DIR``, merged, ``--to CKPT`` or ``--to_hf DIR``
    (see docs/finetuning.md).

    Args:
        from_hf: a Hugging Face model directory (config.json, safetensors weights, optionally tokenizer.json)
            to read; its tokenizer goes inside the checkpoint.
        to: the Lightning checkpoint file to write from --from_hf or from a sharded --ckpt_path (llmzoo
            fit/validate/generate --ckpt_path read it).
        ckpt_path: a Lightning checkpoint to export with --to_hf, or a sharded checkpoint (a directory) to write
            as one file with --to.
        to_hf: the Hugging Face directory to write from --ckpt_path, with the run's tokenizer.
        dtype: dtype of the written weights (float32, bfloat16, float16); default: the source's.
        allow_pickle: read pytorch_model.bin weights (pickles, loaded with weights_only=True) when there are no
            safetensors; only for files you trust.
        max_shard_size: --to_hf weights are split into shards past this size (bytes, or "500MB", "2GiB").
        overwrite: replace an existing checkpoint file or Hugging Face directory.
        tokenizer: the tokenizer to export with --to_hf (a tokenizer.json, its directory or a checkpoint);
            default: the checkpoint's own.
        model_class: for --ckpt_path, the class of a checkpoint that does not record it (Llama, GPT2, ...).
        quantize: with --ckpt_path and --to, write the model with int8 or int4 weight-only quantized weights
            (for llmzoo generate; its tokenizer kept, its training state left out).
        group_size: input columns per scale and zero of int4 (32, 64, 128 or 256).
        to_onnx: the directory to write ONNX graphs of --ckpt_path's model into (prefill.onnx, decode.onnx, with
            the KV cache as inputs and outputs; needs pip install "llmzoo[onnx]").
        to_peft: the Hugging Face PEFT directory to write the LoRA adapters of --ckpt_path's run into (PEFT loads it
            onto the Hugging Face export of the pretrained model). --to_hf of a LoRA run writes the merged model.
        from_peft: a PEFT LoRA directory to merge into the model of --ckpt_path or --from_hf, written with --to
            (a checkpoint) or --to_hf (a Hugging Face directory).
    """
    if to_peft or from_peft:
        return convert_lora(ckpt_path, from_hf, to, to_hf, to_peft, from_peft, model_class, dtype, overwrite)
    if quantize is not None and not (ckpt_path and to and not (from_hf or to_hf or to_onnx)):
        raise ValueError("--quantize writes a quantized checkpoint: --ckpt_path CKPT --quantize int8 --to CKPT")
    if from_hf and to and not (ckpt_path or to_hf or to_onnx):
        path = convert_hf_to_checkpoint(from_hf, to, dtype, allow_pickle, overwrite)
    elif quantize is not None:
        check_options(quantize, group_size)
        if Path(to).exists() and not overwrite:
            raise FileExistsError(f"{to} exists: pass --overwrite true or choose another path")
        save_checkpoint(quantize_checkpoint(read_checkpoint(ckpt_path), quantize, group_size), to)
        path = Path(to)
    elif ckpt_path and to_onnx and not (from_hf or to or to_hf):
        path = export_onnx(load_checkpoint_model(read_checkpoint(ckpt_path), model_class), to_onnx, overwrite)
    elif ckpt_path and to and not (from_hf or to_hf):
        if not is_sharded_checkpoint(ckpt_path):
            if not Path(ckpt_path).is_dir():
                read_checkpoint(ckpt_path)  # a clear error for a missing, truncated, corrupted or unsafe file
            raise ValueError(f"{ckpt_path} is not a sharded checkpoint: --ckpt_path --to makes one file of a "
                             f"directory of shards; export a checkpoint file with --to_hf")
        path = consolidate_checkpoint(ckpt_path, to, overwrite)
    elif ckpt_path and to_hf and not (from_hf or to):
        checkpoint = read_checkpoint(ckpt_path)  # once: for the model and its tokenizer
        exported = (load_tokenizer_for_checkpoint(tokenizer) if tokenizer
                    else load_tokenizer_for_checkpoint(ckpt_path, checkpoint=checkpoint))
        model = load_checkpoint_model(checkpoint, model_class)
        if has_lora(model):  # a LoRA run: the merged model (--to_peft writes the adapters alone)
            print(f"merging the LoRA adapters of {ckpt_path} into the weights", file=sys.stderr)
            merge_lora(model)
        path = write_hf(model, to_hf, exported, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
        write_chat_template(ckpt_path, checkpoint, path)
    else:
        raise ValueError("convert needs --from_hf DIR --to CKPT (Hugging Face -> checkpoint), --ckpt_path CKPT "
                         "--to_hf DIR (checkpoint -> Hugging Face), --ckpt_path SHARDED_DIR --to CKPT (one file), "
                         "--ckpt_path CKPT --quantize int8 --to CKPT or --ckpt_path CKPT --to_onnx DIR")
    print(f"wrote {path}")
    return path


def write_chat_template(source: str, checkpoint: dict | None, directory: Path) -> None:
    """The chat template of a fine-tuning run (kept in its checkpoint), if any, as ``chat_template.jinja`` of an
    exported directory, where transformers' ``apply_chat_template`` finds it."""
    found = stored_template(source, checkpoint)
    if found is not None:
        write_atomic(directory / "chat_template.jinja", found[1].encode("utf-8"))


def convert_lora(ckpt_path: str | None, from_hf: str | None, to: str | None, to_hf: str | None, to_peft: str | None,
                 from_peft: str | None, model_class: str | None, dtype: str | None, overwrite: bool) -> Path:
    """``--ckpt_path CKPT --to_peft DIR`` or ``--from_peft DIR`` (onto --ckpt_path or --from_hf) with --to or --to_hf."""
    if to_peft and ckpt_path and not (from_hf or to or to_hf or from_peft):
        checkpoint = read_checkpoint(ckpt_path)
        model = load_checkpoint_model(checkpoint, model_class)
        path = to_peft_directory(model, to_peft, model.hparams.get("pretrained"), overwrite)
    elif from_peft and bool(ckpt_path) != bool(from_hf) and bool(to) != bool(to_hf) and not to_peft:
        checkpoint = read_checkpoint(ckpt_path) if ckpt_path else None
        model = load_checkpoint_model(checkpoint, model_class) if ckpt_path else from_hf_model(from_hf, dtype)
        tokenizer = load_tokenizer_for_checkpoint(ckpt_path or from_hf, checkpoint=checkpoint)
        merge_lora(from_peft_directory(model, from_peft))
        if to_hf:
            path = write_hf(model, to_hf, tokenizer, dtype=dtype, overwrite=overwrite)
            write_chat_template(ckpt_path or from_hf, checkpoint, path)
        else:
            if Path(to).exists() and not overwrite:
                raise FileExistsError(f"{to} exists: pass --overwrite true or choose another path")
            save_checkpoint({**lightning_checkpoint(model), "tokenizer": tokenizer.state_dict()}, to)
            path = Path(to)
    else:
        raise ValueError("LoRA conversions: --ckpt_path CKPT --to_peft DIR (a LoRA run's adapters), or --from_peft DIR "
                         "with --ckpt_path CKPT or --from_hf DIR and --to CKPT or --to_hf DIR (the merged model)")
    print(f"wrote {path}")
    return path


HELP = " ".join(convert.__doc__.split("\n\n")[0].split())  # its first sentence


def convert_parser() -> ArgumentParser:
    """The parser of ``llmzoo convert``'s options: :func:`convert`'s arguments."""
    parser = ArgumentParser(prog="llmzoo convert", description=HELP, exit_on_error=False)
    parser.add_function_arguments(convert, as_group=False)
    return parser


def run_convert(args: list[str]) -> Path:
    """``llmzoo convert ARGS``; a bad option raises ``ArgumentError``."""
    config = convert_parser().parse_args(args)
    return convert(**{key: value for key, value in config.items() if key != "config"})
