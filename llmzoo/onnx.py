"""ONNX export of a model of the zoo for production runtimes (see docs/inference.md): two graphs that take and
return the KV cache, so that a runtime decodes without re-reading the sequence.

* ``prefill.onnx``: ``input_ids [B, T]``, ``attention_mask [B, T]`` -> ``logits [B, T, V]``,
  ``present.{i}.key`` / ``present.{i}.value [B, Hkv, T, Dh]`` for every layer ``i``;
* ``decode.onnx``: one new token per row, ``input_ids [B, 1]``, ``attention_mask [B, P + 1]`` and the
  ``past.{i}.key`` / ``past.{i}.value [B, Hkv, P, Dh]`` of the tokens before -> ``logits [B, 1, V]`` and the
  ``present`` keys and values ``[B, Hkv, P + 1, Dh]`` (the past with the new token appended).

``attention_mask`` covers every slot so far (1 = token, 0 = left padding), as in :func:`llmzoo.generation.generate`;
positions count real tokens only. A sliding window (Mistral) is applied by the mask: the cache keeps every slot.
Batch, prompt and past lengths are dynamic; the opset is :data:`OPSET`. Needs the ``onnx`` extra
(``pip install "llmzoo[onnx]"``: onnx, onnxscript, and onnxruntime to run the graphs).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

OPSET = 18
GRAPHS = ("prefill", "decode")


class PastKeysValues(nn.Module):
    """The KV cache of one layer as the exported graph sees it: ``k, v [B, Hkv, P, Dh]`` given as inputs, to which
    :meth:`update` appends (the attention's KV-cache interface, without preallocation or rolling)."""

    rolling, newest_sees_all = False, False  # always a mask: one graph for every length

    def __init__(self, k: Tensor, v: Tensor, window: int | None):
        super().__init__()
        self.k, self.v, self.window = k, v, window
        self.length = k.shape[2]

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
        self.length = self.k.shape[2]
        return self.k, self.v, torch.arange(self.length, device=k.device)


class Exported(nn.Module):
    """``model`` as a function of the token ids, the padding mask and the past keys and values (none for the
    prefill), returning the logits and the present keys and values of every layer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        blocks = self.model.blocks
        for i, block in enumerate(blocks):
            attention = block.attention
            if past:
                k, v = past[2 * i], past[2 * i + 1]
            else:
                k = v = input_ids.new_zeros(input_ids.shape[0], attention.num_kv_heads, 0, attention.head_dim,
                                            dtype=self.model.embed.weight.dtype)
            attention.kv_cache = PastKeysValues(k, v, attention.sliding_window)
        try:
            hidden, _ = self.model.backbone(input_ids, attention_mask)
            present = [t for block in blocks for t in (block.attention.kv_cache.k, block.attention.kv_cache.v)]
        finally:
            self.model.clear_kv_cache()
        return self.model.lm_head(hidden).float(), *present


def cache_names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def export_onnx(model: nn.Module, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``prefill.onnx``, ``decode.onnx`` and ``config.json`` (the input and output names, shapes, opset) for
    ``model`` (float weights; see the module docstring) into ``directory``; returns it. The weights are inside
    each graph, or beside it (``<graph>.onnx.data``) past 1 GiB."""
    from llmzoo.files import new_directory

    if getattr(model, "quantization", None):
        raise ValueError("the model is quantized: export the float model to ONNX (quantize in the runtime if needed)")
    model = model.eval()
    layers, attention = len(model.blocks), model.blocks[0].attention
    context = model.hparams.max_position_embeddings
    batch, new, past = (torch.export.Dim("batch", max=1024), torch.export.Dim("new", max=context),
                        torch.export.Dim("past", max=context - 1))
    external = model.num_parameters() * model.embed.weight.itemsize > 2**30  # protobuf's 2 GiB limit, with room
    ids = torch.randint(0, model.hparams.vocab_size, (2, 3), device=model.device)
    kv = [torch.randn(2, attention.num_kv_heads, 4, attention.head_dim, dtype=model.embed.weight.dtype,
                      device=model.device) for _ in range(2 * layers)]  # distinct tensors: export aliases repeats
    outputs = ["logits", *cache_names(layers, "present")]
    graphs = {
        "prefill": dict(args=(ids, torch.ones_like(ids)), input_names=["input_ids", "attention_mask"],
                        dynamic_shapes=({0: batch, 1: new}, {0: batch, 1: new})),
        "decode": dict(args=(ids[:, :1], torch.ones(2, 5, dtype=ids.dtype, device=ids.device), *kv),
                       input_names=["input_ids", "attention_mask", *cache_names(layers, "past")],
                       dynamic_shapes=({0: batch}, {0: batch, 1: past + 1}, ({0: batch, 2: past},) * 2 * layers)),
    }
    with new_directory(directory, overwrite) as target, torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="# The axis name")  # the exporter's note on shared dynamic axes
        for name, graph in graphs.items():
            torch.onnx.export(Exported(model).eval(), graph["args"], str(Path(target) / f"{name}.onnx"), dynamo=True,
                              opset_version=OPSET, input_names=graph["input_names"], output_names=outputs,
                              dynamic_shapes=graph["dynamic_shapes"], external_data=external, verbose=False)
        config = {"opset": OPSET, "num_layers": layers, "num_kv_heads": attention.num_kv_heads,
                  "head_dim": attention.head_dim, "vocab_size": model.hparams.vocab_size,
                  "max_position_embeddings": model.hparams.max_position_embeddings,
                  "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
                  "inputs": {name: graph["input_names"] for name, graph in graphs.items()}, "outputs": outputs}
        (Path(target) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)
