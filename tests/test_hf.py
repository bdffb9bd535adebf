"""Hugging Face interop: directories in both directions, checkpoints, tokenizers, refusals.

Reference models are built from tiny configs with random weights; nothing is downloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import TINY_CONFIGS, tiny_model

transformers = pytest.importorskip("transformers")

from hf_reference import CASES, VOCAB, hf_model, randomize  # noqa: E402

from llmzoo import GPT, GPT2, Llama, Mixtral  # noqa: E402
from llmzoo.hf import (convert_checkpoint_to_hf, convert_hf_to_checkpoint, from_hf, hf_state_dict,  # noqa: E402
                       load_checkpoint_model, to_hf)

ATOL = 1e-5
EXPORTED = {  # llmzoo models (tiny, random) exported to transformers: every family, tied and untied heads
    "GPT": ("GPT", {}),
    "GPT-untied": ("GPT", dict(tie_word_embeddings=False)),
    "GPT2": ("GPT2", dict(ffn_dim=48)),
    "GPT2-untied": ("GPT2", dict(tie_word_embeddings=False)),
    "Llama": ("Llama", {}),
    "Llama-tied-mqa": ("Llama", dict(tie_word_embeddings=True, num_kv_heads=1)),
    "Llama-bias-headdim": ("Llama", dict(bias=True, head_dim=16, num_kv_heads=4)),
    "Llama-llama3-rope": ("Llama", dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8, low_freq_factor=1, high_freq_factor=4, original_max_position_embeddings=16))),
    "Mistral": ("Mistral", dict(sliding_window=5)),
    "Mixtral": ("Mixtral", {}),
    "Qwen2": ("Qwen2", {}),
    "Qwen2-untied-mha": ("Qwen2", dict(tie_word_embeddings=False, num_kv_heads=None)),
    "Qwen3": ("Qwen3", {}),
    "Qwen3-tied-mqa-linear-rope": ("Qwen3", dict(tie_word_embeddings=True, num_kv_heads=1, rope_scaling=dict(
        rope_type="linear", factor=4.0))),
}


def zoo_model(case: str) -> torch.nn.Module:
    name, overrides = EXPORTED[case]
    model = tiny_model(name, vocab_size=VOCAB, **overrides).eval()
    randomize(model)
    return model


def load_transformers(directory, **kwargs):
    kwargs = {"dtype": torch.float32, "attn_implementation": "eager", **kwargs}
    return transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()


def max_diff(model, reference, input_ids) -> float:
    with torch.no_grad():
        return (model(input_ids) - reference(input_ids).logits).abs().max().item()


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 24))  # longer than every sliding window


# ---------------------------------------------------------------------------------------- both directions
@pytest.mark.parametrize("case", CASES)
def test_hugging_face_directory_imports_with_equal_logits(case, tmp_path, ids):
    reference = hf_model(case)
    reference.save_pretrained(tmp_path)
    model = from_hf(tmp_path)
    assert type(model) is CASES[case][2]
    assert not model.training and model.embed.weight.dtype == torch.float32
    assert max_diff(model, reference, ids) <= ATOL


@pytest.mark.parametrize("case", EXPORTED)
def test_export_loads_in_transformers_with_equal_logits(case, tmp_path, ids):
    model = zoo_model(case)
    to_hf(model, tmp_path)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    reference = load_transformers(tmp_path)
    assert type(reference).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    assert reference.config.tie_word_embeddings == model.hparams.tie_word_embeddings
    assert max_diff(model, reference, ids) <= ATOL
    again = from_hf(tmp_path)  # and back: identical weights, same class and arguments
    assert type(again) is type(model)
    assert {k: v for k, v in again.hparams.items() if k not in ("ffn_dim", "head_dim", "num_kv_heads", "dropout")} \
        .items() <= dict(model.hparams).items()
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_mixtral_is_written_per_expert_and_read_in_both_layouts(tmp_path, ids):
    model = zoo_model("Mixtral")
    to_hf(model, tmp_path / "export")
    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert not any("gate_up_proj" in name for name in names)
    # the fused in-memory layout of transformers 5 (mlp.experts.gate_up_proj / down_proj) reads too
    reference = load_transformers(tmp_path / "export")
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, fused / "model.safetensors")
    (fused / "config.json").write_text((tmp_path / "export" / "config.json").read_text())
    with safe_open(fused / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in set(f.keys())
    assert max_diff(from_hf(fused), reference, ids) <= ATOL


def test_bf16_stays_bf16_both_ways(tmp_path):
    reference = hf_model("llama-gqa", dtype=torch.bfloat16)
    reference.save_pretrained(tmp_path / "hf")
    model = from_hf(tmp_path / "hf")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope.inv_freq.dtype == torch.float32  # RoPE frequencies are not rounded to bf16
    assert torch.equal(model.blocks[0].attention.qkv.weight[:32], reference.model.layers[0].self_attn.q_proj.weight)
    to_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # dtype="auto"
    assert again.dtype == torch.bfloat16
    for name, tensor in reference.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    assert from_hf(tmp_path / "hf", dtype="float32").embed.weight.dtype == torch.float32


def test_sharded_directories_both_ways(tmp_path, ids):
    reference = hf_model("mixtral-top2-of-4")
    reference.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = from_hf(tmp_path / "hf")
    assert max_diff(model, reference, ids) <= ATOL
    to_hf(model, tmp_path / "out", max_shard_size="30KB")
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "out" / "model.safetensors").exists()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(4 * t.numel() for t in hf_state_dict(model).values())
    assert max_diff(model, load_transformers(tmp_path / "out"), ids) <= ATOL
    assert max_diff(from_hf(tmp_path / "out"), reference, ids) <= ATOL


def test_import_and_export_need_no_transformers(tmp_path):
    """A fresh interpreter whose site-packages lacks transformers (a link farm of every other entry)."""
    site_packages = Path(transformers.__file__).parents[1]
    farm = tmp_path / "site-packages"
    farm.mkdir()
    for entry in site_packages.iterdir():
        if not entry.name.lower().startswith("transformers"):
            (farm / entry.name).symlink_to(entry)
    repo, tests = Path(__file__).parents[1], Path(__file__).parent
    script = f"""
import importlib.util, torch
assert importlib.util.find_spec("transformers") is None
from tiny import TINY_CONFIGS, tiny_model
from llmzoo.hf import from_hf, to_hf
model = tiny_model("Mixtral").eval()
to_hf(model, {str(tmp_path / "out")!r})
again = from_hf({str(tmp_path / "out")!r})
ids = torch.randint(0, 97, (1, 9))
assert torch.equal(again(ids), model(ids))
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (repo, tests, farm)))}
    result = subprocess.run([sys.executable, "-S", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# ---------------------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE trained on a few sentences, special tokens first (ids 0, 1, 2) as llmzoo's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 3, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60], show_progress=False)
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4
    tokenizer.train_from_iterator([text], trainer)
    assert tokenizer.get_vocab_size() <= VOCAB
    return tokenizer


class ZooTokenizer:
    """Stands for llmzoo.data.Tokenizer: the HF tokenizer as .tokenizer, the special tokens as strings."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token, self.pad_token = "<|bos|>", "<|eos|>", "<|pad|>"


@pytest.mark.parametrize("form", ["tokenizers", "path", "llmzoo"])
def test_tokenizer_export_loads_with_auto_tokenizer(form, bpe, tmp_path):
    bpe.save(str(tmp_path / "tokenizer.json"))
    tokenizer = {"tokenizers": bpe, "path": tmp_path / "tokenizer.json", "llmzoo": ZooTokenizer(bpe)}[form]
    to_hf(tiny_model("GPT2", vocab_size=VOCAB), tmp_path / "out", tokenizer)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
    for text in ["to be, or not", "Whether 'tis nobler<|eos|> x", "  odd   spacing\n\tand é"]:
        expected = bpe.encode(text).ids
        assert loaded(text)["input_ids"] == expected
        assert loaded.decode(expected) == bpe.decode(expected, skip_special_tokens=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)
    assert generation == {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def test_special_tokens_from_arguments(bpe, tmp_path):
    to_hf(tiny_model("Llama", vocab_size=VOCAB), tmp_path, bpe, eos_token="<|pad|>", pad_token="<|eos|>")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.eos_token_id, loaded.pad_token_id) == (2, 1)
    with pytest.raises(ValueError, match=r"eos_token '<\|end\|>' is not in the tokenizer's vocabulary"):
        to_hf(tiny_model("Llama", vocab_size=VOCAB), tmp_path / "x", bpe, eos_token="<|end|>")
    with pytest.raises(ValueError, match="the tokenizer has .* tokens but the model's vocab_size is 50"):
        to_hf(tiny_model("Llama", vocab_size=50), tmp_path / "y", bpe)


@pytest.mark.parametrize("case", ["GPT", "GPT2", "Llama", "Mixtral", "Qwen2", "Qwen3"])
def test_pipeline_greedy_text_equals_llmzoo_generate(case, bpe, tmp_path):
    model = zoo_model(case)
    to_hf(model, tmp_path, ZooTokenizer(bpe))
    generator = transformers.pipeline("text-generation", model=str(tmp_path), device="cpu")
    prompt = "to be, or not"
    text = generator(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    ids = torch.tensor([bpe.encode(prompt).ids])
    tokens = model.generate(ids, max_new_tokens=12, eos_token_id=1)[0, ids.shape[1]:].tolist()
    expected = bpe.decode(tokens[:tokens.index(1)] if 1 in tokens else tokens)
    assert text == expected


# ---------------------------------------------------------------------------------------- checkpoints
class Windows(L.LightningDataModule):
    """Random token windows ``[B, 17]`` of a fixed seed."""

    def __init__(self, vocab_size: int = VOCAB):
        super().__init__()
        self.windows = torch.randint(0, vocab_size, (8, 17), generator=torch.Generator().manual_seed(1))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.windows, batch_size=4)

    val_dataloader = train_dataloader


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


@pytest.mark.parametrize("case", ["gpt2", "llama-mqa-tied", "mixtral-top2-of-4"])
def test_hugging_face_to_checkpoint_loads_without_arguments(case, tmp_path, ids):
    reference = hf_model(case)
    reference.save_pretrained(tmp_path / "hf")
    ckpt = convert_hf_to_checkpoint(tmp_path / "hf", tmp_path / "model.ckpt")
    cls = CASES[case][2]
    for weights_only in (None, True):
        model = cls.load_from_checkpoint(ckpt, weights_only=weights_only).eval()
        assert type(model) is cls
        assert max_diff(model, reference, ids) <= ATOL
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        convert_hf_to_checkpoint(tmp_path / "hf", ckpt)
    convert_hf_to_checkpoint(tmp_path / "hf", ckpt, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["hf", "model.ckpt"]  # no temporary file left


def test_converted_checkpoint_validates_and_fine_tunes(tmp_path):
    reference = hf_model("llama-gqa")
    reference.save_pretrained(tmp_path / "hf")
    ckpt = convert_hf_to_checkpoint(tmp_path / "hf", tmp_path / "model.ckpt")
    data = Windows()
    model = from_hf(tmp_path / "hf")
    with torch.no_grad():
        expected = model.token_nll(data.windows)[0].item()
    fresh = Llama(**dict(model.hparams))  # random weights: validate must load the checkpoint's
    (metrics,) = quiet_trainer().validate(fresh, datamodule=data, ckpt_path=ckpt, weights_only=True)
    assert metrics["val/loss"] == pytest.approx(expected, abs=1e-5)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(Llama(**dict(model.hparams)), datamodule=data, ckpt_path=ckpt, weights_only=True)
    assert trainer.global_step == 2  # a fresh start from the imported weights, fresh optimizer


def test_lightning_cli_reads_the_checkpoint_class_and_arguments(tmp_path):
    """``llmzoo fit/validate --ckpt_path``: LightningCLI (subclass mode, as llmzoo's CLI) rebuilds the model."""
    from lightning.pytorch.cli import LightningCLI

    from llmzoo import CausalLM

    hf_model("llama-mqa-tied").save_pretrained(tmp_path / "hf")
    ckpt = convert_hf_to_checkpoint(tmp_path / "hf", tmp_path / "model.ckpt")
    cli = LightningCLI(CausalLM, Windows, subclass_mode_model=True, save_config_callback=None, args=[
        "validate", "--model", "Llama", "--ckpt_path", str(ckpt), "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", f"--trainer.default_root_dir={tmp_path}"])
    assert cli.model.hparams.num_kv_heads == 1 and cli.model.hparams.tie_word_embeddings
    assert torch.equal(cli.model.embed.weight, from_hf(tmp_path / "hf").embed.weight)


def test_checkpoint_to_hugging_face(tmp_path, bpe, ids):
    model = zoo_model("Mixtral")
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(model, datamodule=Windows())
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    anonymous = torch.load(tmp_path / "trained.ckpt", weights_only=True)  # a checkpoint that records no class
    anonymous.pop("llmzoo_architecture", None)
    torch.save(anonymous, tmp_path / "anonymous.ckpt")
    with pytest.raises(ValueError, match="does not name its architecture: pass model_class"):
        convert_checkpoint_to_hf(tmp_path / "anonymous.ckpt", tmp_path / "hf")
    convert_checkpoint_to_hf(tmp_path / "anonymous.ckpt", tmp_path / "hf", ZooTokenizer(bpe), model_class="Mixtral")
    model.eval()
    assert max_diff(model, load_transformers(tmp_path / "hf"), ids) <= ATOL
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").eos_token == "<|eos|>"
    # and a converted checkpoint names its class itself
    ckpt = convert_hf_to_checkpoint(tmp_path / "hf", tmp_path / "converted.ckpt")
    convert_checkpoint_to_hf(ckpt, tmp_path / "hf2")
    assert max_diff(model, load_transformers(tmp_path / "hf2"), ids) <= ATOL
    assert type(load_checkpoint_model(ckpt, model_class="Llama")) is Mixtral  # Mixtral is a Llama
    with pytest.raises(ValueError, match="holds a llmzoo.models.mixtral.Mixtral, not a GPT2"):
        load_checkpoint_model(ckpt, model_class=GPT2)


# ---------------------------------------------------------------------------------------- refusals and errors
def saved(case: str, directory: Path) -> Path:
    hf_model(case).save_pretrained(directory)
    return directory


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    path.write_text(json.dumps(config))


def test_pickled_weights_need_the_flag(tmp_path, ids):
    reference = hf_model("gpt2")
    reference.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"pickled weights \(pytorch_model.bin\).*allow_pickle=True"):
        from_hf(tmp_path)
    assert max_diff(from_hf(tmp_path, allow_pickle=True), reference, ids) <= ATOL
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert max_diff(from_hf(tmp_path, allow_pickle=True), reference, ids) <= ATOL  # torch's pre-1.6 format too


def test_model_type_alone_picks_the_class_and_remote_code_is_never_run(tmp_path):
    saved("llama-gqa", tmp_path)
    edit_config(tmp_path, auto_map={"AutoModelForCausalLM": "evil.EvilForCausalLM"}, trust_remote_code=True)
    (tmp_path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    assert type(from_hf(tmp_path)) is Llama
    edit_config(tmp_path, model_type="evil")
    with pytest.raises(ValueError, match="model_type 'evil' is not supported: llmzoo imports openai-gpt, gpt2, "
                                         "llama, mistral, mixtral, qwen2, qwen3"):
        from_hf(tmp_path)


def test_legacy_rope_keys(tmp_path, ids):
    """Configs written by transformers 4 hold rope_theta and rope_scaling ({"type": ...}) at the top."""
    reference = hf_model("llama-linear-rope")
    reference.save_pretrained(tmp_path)
    edit_config(tmp_path, rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})
    assert max_diff(from_hf(tmp_path), reference, ids) <= ATOL
    edit_config(tmp_path, rope_scaling=None)
    assert from_hf(tmp_path).hparams.rope_scaling is None


@pytest.mark.parametrize("case, changes, message", [
    ("llama-gqa", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope_type 'yarn' is not supported: llmzoo implements 'default', 'linear', 'llama3'"),
    ("llama-gqa", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    ("llama-gqa", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ("llama-gqa", dict(attention_bias=True), "attention_bias != mlp_bias"),
    ("llama-gqa", dict(quantization_config={"quant_method": "gptq"}), "quantized checkpoints"),
    ("gpt2", dict(activation_function="gelu"), "activation_function 'gelu' is not supported"),
    ("gpt2", dict(scale_attn_weights=False), "scale_attn_weights=False is not supported"),
    ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    ("gpt", dict(afn="relu"), "afn 'relu' is not supported"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1, layer_types=None),
     r"qwen2 with sliding_attention layers \[1\] \(use_sliding_window / layer_types\) is not supported"),
    ("qwen3", dict(layer_types=["full_attention", "sliding_attention"]), "qwen3 with sliding_attention layers"),
    ("qwen3", dict(attention_bias=True), "qwen3 with attention_bias=True is not supported"),
    ("qwen2", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ("qwen3", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}), "rope_type 'yarn'"),
])
def test_configs_llmzoo_cannot_represent_are_refused(case, changes, message, tmp_path):
    saved(case, tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        from_hf(tmp_path)


def test_router_jitter_is_ignored_with_a_warning(tmp_path):
    saved("mixtral-top2-of-4", tmp_path)
    edit_config(tmp_path, router_jitter_noise=0.1)
    with pytest.warns(UserWarning, match="router_jitter_noise=0.1 is ignored"):
        from_hf(tmp_path)


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
    saved("llama-gqa", tmp_path)
    path = tmp_path / "model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.extra.weight"] = torch.zeros(1)
    norm = tensors.pop("model.norm.weight")
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\], unexpected \['model.layers.0.extra.weight'\]"):
        from_hf(tmp_path)
    del tensors["model.layers.0.extra.weight"]
    save_file({**tensors, "model.norm.weight": torch.cat([norm, norm])}, path)
    with pytest.raises(ValueError, match=r"shape mismatch for norm.weight \(from model.norm.weight\): "
                                         r"Hugging Face gives \(64,\), the model has \(32,\)"):
        from_hf(tmp_path)


def test_bad_directories_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory: llmzoo reads local .*nothing is downloaded"):
        from_hf("gpt2-not-a-local-dir")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no weights in .*: expected model.safetensors"):
        from_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../secret.safetensors"}}))
    with pytest.raises(ValueError, match="shards must be plain file names"):
        from_hf(tmp_path)


def test_export_refusals(tmp_path):
    with pytest.raises(ValueError, match="Transformer has no Hugging Face twin"):
        to_hf(tiny_model("Transformer"), tmp_path / "t")
    class ReluGPT(GPT):
        activation = "relu"

    with pytest.raises(ValueError, match="ReluGPT with activation 'relu' cannot be exported"):
        to_hf(ReluGPT(**TINY_CONFIGS["GPT"]), tmp_path / "r")
    with pytest.raises(ValueError, match="GPT with ffn_dim=48 cannot be exported"):
        to_hf(tiny_model("GPT", ffn_dim=48), tmp_path / "g")
    with pytest.raises(ValueError, match="Mistral with bias=True cannot be exported"):
        to_hf(tiny_model("Mistral", bias=True), tmp_path / "m")
    with pytest.raises(ValueError, match="Qwen2 with bias=True cannot be exported: transformers' qwen2 has biases on q"):
        to_hf(tiny_model("Qwen2", bias=True), tmp_path / "q")
    with pytest.raises(ValueError, match="Qwen2 with qkv_bias=False cannot be exported"):
        to_hf(tiny_model("Qwen2", qkv_bias=False), tmp_path / "q")
    with pytest.raises(ValueError, match="Qwen3 with bias=True cannot be exported"):
        to_hf(tiny_model("Qwen3", bias=True), tmp_path / "q")
    with pytest.raises(ValueError, match="special tokens were given without a tokenizer"):
        to_hf(tiny_model("Llama"), tmp_path / "l", eos_token="</s>")
    assert not any(tmp_path.iterdir())  # nothing was written


def test_export_never_leaves_a_half_written_directory(tmp_path, monkeypatch):
    model = tiny_model("Llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty: pass overwrite=True"):
        to_hf(model, tmp_path / "out")
    with pytest.raises(FileExistsError, match="holds no config.json: refusing to replace"):
        to_hf(model, tmp_path / "out", overwrite=True)
    (tmp_path / "out" / "notes.txt").unlink()
    to_hf(model, tmp_path / "out", max_shard_size=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    to_hf(model, tmp_path / "out", overwrite=True)  # replaced whole: no stale shards or index left
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("llmzoo.hf.save_hf_weights", fail)
    for target, overwrite in ((tmp_path / "new", False), (tmp_path / "out", True)):
        with pytest.raises(OSError, match="disk full"):
            to_hf(model, target, overwrite=overwrite)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no partial directory, the old export intact
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors"]
