"""``llmzoo convert``: Hugging Face directories, Lightning checkpoints and sharded checkpoints, one into another.
It needs no model, data or Trainer, so :func:`~llmzoo.cli.main` runs it before LightningCLI starts."""

from __future__ import annotations

from pathlib import Path

from jsonargparse import ArgumentParser

from llmzoo.checkpoints import is_sharded_checkpoint, read_checkpoint
from llmzoo.data import load_tokenizer_for_checkpoint
from llmzoo.hf import DEFAULT_MAX_SHARD_SIZE, convert_hf_to_checkpoint
from llmzoo.hf import to_hf as write_hf
from llmzoo.models.build import load_checkpoint_model
from llmzoo.strategies import consolidate_checkpoint


def convert(from_hf: str | None = None, to: str | None = None, ckpt_path: str | None = None,
            to_hf: str | None = None, dtype: str | None = None, allow_pickle: bool = False,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
            tokenizer: str | None = None, model_class: str | None = None) -> Path:
    """Convert a Hugging Face directory to a Lightning checkpoint, a checkpoint to a Hugging Face directory, or a
    sharded checkpoint to one file.

    ``--from_hf DIR --to CKPT``, ``--ckpt_path CKPT --to_hf DIR`` (see docs/interop.md) or
    ``--ckpt_path SHARDED_DIR --to CKPT`` (see docs/distributed.md).

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
    """
    if from_hf and to and not (ckpt_path or to_hf):
        path = convert_hf_to_checkpoint(from_hf, to, dtype, allow_pickle, overwrite)
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
        path = write_hf(load_checkpoint_model(checkpoint, model_class), to_hf, exported, dtype=dtype,
                        max_shard_size=max_shard_size, overwrite=overwrite)
    else:
        raise ValueError("convert needs --from_hf DIR --to CKPT (Hugging Face -> checkpoint), --ckpt_path CKPT "
                         "--to_hf DIR (checkpoint -> Hugging Face) or --ckpt_path SHARDED_DIR --to CKPT (one file)")
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
