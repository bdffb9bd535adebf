"""Fast inference: the static-shape (compiled) decode step, weight-only int8 / int4 quantization, quantized
checkpoints, ONNX export. Compiled tests use the ``aot_eager`` backend (graph capture and functionalization,
no code generation: seconds) for every architecture; inductor's own code runs in one test, and for every
architecture in the slow suite."""

import re
import warnings
from pathlib import Path

import pytest
import torch
from test_cli_generate_convert import TEXT, generate_cli, llmzoo, zoo  # noqa: F401  (zoo: a fixture)
from test_generation import padded_batch, sharpened
from tiny import TINY_CONFIGS, tiny_model

from llmzoo.generation import generate
from llmzoo.quantize import quantize

ARCHS = sorted(TINY_CONFIGS)


# --------------------------------------------------------------------------------------------- compiled decode
def compiled_equals_eager(model, backend, new_tokens=20, padded=True, **options):
    """Greedy (or the given strategy) on a left-padded batch (or an unpadded one): compiled == eager tokens."""
    torch.manual_seed(0)
    _, ids, mask = padded_batch([9, 3, 6])
    kwargs = dict(attention_mask=mask) if padded else {}
    eager = generate(model, ids, max_new_tokens=new_tokens, **kwargs, **options)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "torch.compile failed")  # no silent fall back to eager
        compiled = generate(model, ids, max_new_tokens=new_tokens, compile=backend, **kwargs, **options)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("name", ARCHS)
def test_compiled_decode_gives_the_eager_tokens(name):
    """Every architecture, a left-padded batch, 20 new tokens: past Mistral's and Mixtral's window of 8."""
    compiled_equals_eager(sharpened(tiny_model(name)).eval(), "aot_eager")


@pytest.mark.parametrize("options", [dict(num_beams=3, eos_token_id=5), dict(do_sample=True, seed=3, top_k=20),
                                     dict(repetition_penalty=1.3, eos_token_id=7)], ids=["beams", "sampling", "eos"])
def test_compiled_decode_keeps_beams_sampling_and_stopping(options):
    compiled_equals_eager(sharpened(tiny_model("Mistral")).eval(), "aot_eager", new_tokens=24, **options)


def test_compiled_step_is_compiled_once_and_the_model_is_left_clean():
    """An unpadded batch (no mask but the cache's) through Mistral's rolling buffer, twice: one graph."""
    import torch._dynamo

    model = sharpened(tiny_model("Mistral")).train()
    ids = torch.randint(0, 97, (2, 5))
    expected = generate(model, ids, max_new_tokens=20)
    torch._dynamo.utils.counters.clear()
    for _ in range(2):  # a new KV cache each call: its buffers are inputs of the same graph
        assert torch.equal(generate(model, ids, max_new_tokens=20, compile="aot_eager"), expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert model.kv_cache_length == 0 and model.training


def test_inductor_compiled_decode_gives_the_eager_tokens():
    compiled_equals_eager(sharpened(tiny_model("Llama")).eval(), True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_inductor_compiled_decode_gives_the_eager_tokens_for_every_architecture(name):
    compiled_equals_eager(sharpened(tiny_model(name)).eval(), True)


def test_a_failing_compile_falls_back_with_one_warning(monkeypatch):
    def broken_compile(fn, **options):
        def compiled(*args):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore lines")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    model = sharpened(tiny_model("Llama")).eval()
    ids = torch.randint(0, 97, (2, 5))
    with pytest.warns(UserWarning, match="torch.compile failed, decoding without it") as caught:
        out = generate(model, ids, max_new_tokens=12, compile="broken")
    assert len(caught) == 1 and "more lines" not in str(caught[0].message)
    assert torch.equal(out, generate(model, ids, max_new_tokens=12))


def test_compile_refuses_what_it_cannot_do():
    model = tiny_model("Llama")
    ids = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="compile needs the KV cache"):
        generate(model, ids, compile=True, use_cache=False)
    with pytest.raises(ValueError, match="not to speculative decoding"):
        generate(model, ids, compile=True, draft_model=tiny_model("Llama", num_layers=1))


def test_static_cache_mask_names_the_slot_each_buffer_entry_holds():
    """A rolling buffer of 4 (window 3 + 1 spare) at query slot 9 holds slots 8, 9, 6, 7 at positions 0..3;
    the window keeps 7, 8, 9; a full cache holds slot j at j and nothing past the query."""
    from llmzoo.layers import KVCache

    rolling = KVCache(1, 1, 2, max_length=32, window=3, max_rollback=1)
    assert rolling.mask(torch.tensor([9]))[0, 0, 0].tolist() == [True, True, False, True]
    full = KVCache(2, 1, 2, max_length=6)
    padding = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    assert full.mask(torch.tensor([3]), padding)[:, 0, 0].tolist() == [[False, True, True, True, False, False],
                                                                        [True, True, True, True, False, False]]


# --------------------------------------------------------------------------------------------- quantization
QUANT_CONFIG = dict(ffn_dim=64)  # int4 groups of 32 must divide every input width (the tiny ffn_dim 48 does not)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", ARCHS)
def test_quantized_logits_are_close_to_float(name):
    """Every Linear and the experts in int8 (per channel) or int4 (groups of 32), bf16 activations in the kernels."""
    ids = torch.randint(0, 97, (2, 9))
    for mode, bound in (("int8", 0.02), ("int4", 0.15)):
        model = tiny_model(name, **QUANT_CONFIG).eval()
        with torch.no_grad():
            expected = model(ids)
            quantize(model, mode, group_size=32)
            assert relative_error(model(ids), expected) < bound, mode
        assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if not n.endswith("router"))


def test_quantized_weights_dequantize_to_what_the_kernels_multiply_by():
    """The int4 CPU kernel's own layout (tiled by the CPU's vector width, tails of 16 and 32 rows) unpacks to the
    levels that were packed; int8 and int4 kernels equal a float product with the dequantized weight."""
    from llmzoo.layers.quantized import Int4Weight, Int8Weight

    for rows, columns in ((48, 64), (96, 32), (112, 256), (97, 64)):
        weight = torch.randn(rows, columns)
        x = torch.randn(3, columns).bfloat16().float()
        for quantized in (Int8Weight.quantize(weight), Int4Weight.quantize(weight, 32)):
            expected = x @ quantized.dequantize().T
            product = quantized.matmul(x)
            if product is not None:  # int4 needs rows divisible by 16
                assert relative_error(product.float(), expected) < 1e-2
            state = quantized.state_dict()
            copy = type(quantized)(tuple(weight.shape), *([32] if isinstance(quantized, Int4Weight) else []))
            copy.load_state_dict(state)
            assert torch.equal(copy.dequantize(), quantized.dequantize())
        int4 = Int4Weight.quantize(weight, 32)
        assert int4.packed == (rows % 16 == 0)
        assert relative_error(int4.dequantize(), weight) < 0.1


def test_quantized_model_compiles_to_the_same_tokens_and_reports_its_size():
    model = sharpened(tiny_model("Mixtral", **QUANT_CONFIG)).eval()
    before = model.memory_footprint()
    quantize(model, "int8")
    after = model.memory_footprint()
    assert after["fp32"] == before["fp32"] and after["held"] < 0.45 * before["held"]  # embedding stays float
    compiled_equals_eager(model, "aot_eager")


def test_quantized_checkpoint_round_trip(tmp_path):
    """Saved and read back with weights_only (no pickle), the same logits; the tokenizer and hyperparameters kept."""
    from llmzoo.checkpoints import QUANTIZATION_KEY, read_checkpoint, save_checkpoint
    from llmzoo.hf import lightning_checkpoint
    from llmzoo.models.build import load_checkpoint_model
    from llmzoo.quantize import quantize_checkpoint

    ids = torch.randint(0, 97, (2, 9))
    for name, mode in (("Qwen2", "int4"), ("Mixtral", "int8")):  # tied head (a quantized copy), experts
        model = tiny_model(name, **QUANT_CONFIG).eval()
        checkpoint = {**lightning_checkpoint(model), "tokenizer": {"kept": "yes"}}
        quantized = quantize_checkpoint(checkpoint, mode, group_size=32)
        save_checkpoint(quantized, tmp_path / "q.ckpt")
        stored = read_checkpoint(tmp_path / "q.ckpt")
        assert stored[QUANTIZATION_KEY] == {"mode": mode, "group_size": 32, "head": True}
        assert stored["tokenizer"] == {"kept": "yes"} and stored["optimizer_states"] == []
        loaded = load_checkpoint_model(stored).eval()
        with torch.no_grad():
            assert torch.equal(loaded(ids), quantize(model, mode, group_size=32)(ids))


@pytest.mark.parametrize("call,message", [
    (lambda m: quantize(m, "int3"), "unknown quantization mode 'int3': use 'int8' or 'int4'"),
    (lambda m: quantize(m, "int4", group_size=48), "group_size must be one of 32, 64, 128, 256 for int4, got 48"),
    (lambda m: quantize(m, "int4", group_size=64),
     "group_size=64 does not divide the 32 input columns of blocks.0.attention.qkv: use group_size=32"),
    (lambda m: quantize(quantize(m, "int8"), "int8"), "the model is quantized already"),
])
def test_bad_quantization_options_are_one_line_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(tiny_model("Llama", **QUANT_CONFIG))
    with pytest.raises(ValueError, match="does not divide the 48 input columns of blocks.0.mlp.down: use int8"):
        quantize(tiny_model("Llama"), "int4")


# --------------------------------------------------------------------------------------------- the command line
def test_cli_quantized_checkpoint_and_compiled_generation(zoo, capsys, tmp_path, monkeypatch):
    """convert --quantize int8 writes a checkpoint that generate decodes as it is; generate --quantize int8 on the
    float checkpoint gives the same text; --compile (aot_eager here: seconds) changes no token."""
    from llmzoo.models.build import load_checkpoint_model

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real_compile(fn, **{**options, "backend": "aot_eager",
                                                                                     "mode": None}))
    quantized = tmp_path / "int8.ckpt"
    assert llmzoo(capsys, "convert", "--ckpt_path", zoo.target, "--quantize", "int8", "--to", quantized).code == 0
    greedy = ("--prompt", "To be", "--do_sample", "false", "--max_new_tokens", "12")
    texts = {flags: generate_cli(capsys, checkpoint, *greedy, *flags).out
             for checkpoint, flags in ((quantized, ()), (quantized, ("--compile", "true")),
                                       (zoo.target, ("--quantize", "int8")))}
    assert len(set(texts.values())) == 1
    model = load_checkpoint_model(quantized)
    ids = torch.tensor([zoo.tokenizer.encode("To be")])
    assert texts[()] == "To be" + zoo.tokenizer.decode(generate(model, ids, max_new_tokens=12)[0, 1:].tolist()[
        len(ids[0]) - 1:]) + "\n"
    bad = llmzoo(capsys, "generate", "--ckpt_path", zoo.target, "--quantize", "int2")
    assert bad.code == 1 and "unknown quantization mode 'int2'" in bad.err
    bad = llmzoo(capsys, "convert", "--ckpt_path", zoo.target, "--quantize", "int8", "--to_hf", tmp_path / "x")
    assert bad.code == 1 and "--quantize writes a quantized checkpoint" in bad.err


# --------------------------------------------------------------------------------------------- ONNX
def onnx_runner():
    """The greedy runner of docs/inference.md, executed from the page."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", page, re.S) if "def onnx_greedy" in block)
    scope = {}
    exec(code, scope)
    return scope["onnx_greedy"]


def check_onnx(model, directory):
    """onnxruntime's prefill and decode logits within 1e-4 of llmzoo's on a left-padded batch, and the runner's
    greedy tokens equal to llmzoo's (past Mistral's window)."""
    ort = pytest.importorskip("onnxruntime")
    _, ids, mask = padded_batch([7, 3, 5], vocab=model.hparams.vocab_size)
    prefill = ort.InferenceSession(str(directory / "prefill.onnx"))
    logits, *cache = prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = model(ids, mask)
    real = mask.bool()
    assert (torch.from_numpy(logits) - expected)[real].abs().max() < 1e-4
    expected_tokens = generate(model, ids, attention_mask=mask, max_new_tokens=12)
    tokens = onnx_runner()(str(directory), ids.numpy(), mask.numpy(), 12)
    assert torch.equal(torch.from_numpy(tokens), expected_tokens)
    decode = ort.InferenceSession(str(directory / "decode.onnx"))
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    names = [i.name for i in decode.get_inputs()[2:]]
    step, *_ = decode.run(None, {"input_ids": expected_tokens[:, 7:8].numpy(), "attention_mask": mask.numpy(),
                                 **dict(zip(names, cache))})
    with torch.no_grad():
        expected = model(expected_tokens[:, :8], mask)[:, -1:]
    assert (torch.from_numpy(step) - expected).abs().max() < 1e-4


def test_cli_onnx_export_runs_in_onnxruntime(zoo, capsys, tmp_path):
    pytest.importorskip("onnxscript")
    from llmzoo.models.build import load_checkpoint_model

    result = llmzoo(capsys, "convert", "--ckpt_path", zoo.target, "--to_onnx", tmp_path / "onnx")
    assert result.code == 0, result.err[-2000:]
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["config.json", "decode.onnx", "prefill.onnx"]
    check_onnx(load_checkpoint_model(zoo.target).eval(), tmp_path / "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHS)
def test_onnx_export_of_every_architecture(name, tmp_path):
    pytest.importorskip("onnxscript")
    from llmzoo.onnx import export_onnx

    model = sharpened(tiny_model(name)).eval()
    check_onnx(model, export_onnx(model, tmp_path / name))


def test_onnx_export_refuses_a_quantized_model(tmp_path):
    from llmzoo.onnx import export_onnx

    with pytest.raises(ValueError, match="the model is quantized: export the float model"):
        export_onnx(quantize(tiny_model("Llama"), "int8"), tmp_path / "x")


# --------------------------------------------------------------------------------------------- LoRA on a quantized base
def test_lora_trains_on_a_quantized_frozen_base_and_merges():
    """--model.quantize int8 with LoRA: configure_model quantizes every projection but the head, the adapters stay
    and alone get gradients (through the dequantized weights); the checkpoint records it and loads back; merging
    dequantizes, adds the deltas and quantizes again."""
    from llmzoo.checkpoints import QUANTIZATION_KEY
    from llmzoo.hf import lightning_checkpoint
    from llmzoo.layers.quantized import QuantizedLinear
    from llmzoo.lora import merge_lora
    from llmzoo.models.build import load_checkpoint_model
    from llmzoo.quantize import dequantize

    model = tiny_model("Mixtral", **QUANT_CONFIG, lora=dict(r=8, targets=["q", "v", "out", "experts"]),
                       quantize="int8")
    model.configure_model()
    assert isinstance(model.blocks[0].attention.qkv, QuantizedLinear) and isinstance(model.lm_head, torch.nn.Linear)
    assert model.blocks[0].attention.qkv.adapter is not None
    base = {name: tensor.clone() for name, tensor in model.state_dict().items() if "adapter" not in name}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 97, (4, 17))
    losses = []
    for _ in range(5):
        loss = model.token_nll(batch)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(tensor, model.state_dict()[name]) for name, tensor in base.items())
    checkpoint = lightning_checkpoint(model)
    model.on_save_checkpoint(checkpoint)
    assert checkpoint[QUANTIZATION_KEY] == {"mode": "int8", "group_size": 32, "head": False}
    model.eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = model(ids)
        assert torch.equal(load_checkpoint_model(checkpoint).eval()(ids), expected)
        merged = quantize(merge_lora(dequantize(model)), "int8", head=False)
        assert relative_error(merged(ids), expected) < 0.02


def test_cli_fit_lora_on_a_quantized_base_then_generate(zoo, capsys, tmp_path):
    """llmzoo fit --model.quantize int8 with LoRA from a pretrained checkpoint: the run's checkpoint holds the int8
    base and the adapters, and generate decodes it as it is."""
    from llmzoo.checkpoints import QUANTIZATION_KEY, read_checkpoint

    (tmp_path / "text.txt").write_text(TEXT * 20)
    result = llmzoo(capsys, "fit", "--model.pretrained", zoo.target, "--model.lora.r", "8", "--model.quantize", "int8",
                    "--data", "TextDataModule", "--data.path", tmp_path / "text.txt", "--data.seq_len", "32",
                    "--data.batch_size", "4", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                    "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
                    "--trainer.logger", "false", "--trainer.default_root_dir", tmp_path / "run")
    assert result.code == 0, result.err[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(last)
    assert checkpoint[QUANTIZATION_KEY]["mode"] == "int8"
    assert checkpoint["state_dict"]["blocks.0.attention.qkv.weight.data"].dtype == torch.int8
    assert any(".adapter.B." in name for name in checkpoint["state_dict"])
    generate_cli(capsys, last, "--prompt", "To be", "--do_sample", "false", "--max_new_tokens", "4")
