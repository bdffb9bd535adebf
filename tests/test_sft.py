"""Supervised fine-tuning: instruction formats, chat templates rendered as Hugging Face renders them, the loss on
assistant turns only, batches that resume exactly, and `llmzoo fit --model.pretrained` / `generate --chat` /
`chat` on a tiny pretrained model."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llmzoo import Llama
from llmzoo.checkpoints import save_checkpoint
from llmzoo.cli.chat import HeldBack, chat
from llmzoo.data import TEMPLATES, ChatTemplate, SFTDataModule, Tokenizer, read_records
from llmzoo.data.chat import without_generation_blocks
from llmzoo.data.datasets import Progress
from llmzoo.data.instructions import make_records, write_instructions, write_jsonl
from llmzoo.data.sft import ExampleBatches, encode_chats
from llmzoo.hf import lightning_checkpoint
from llmzoo.lora import lora_state_dict
from test_cli_generate_convert import llmzoo  # `llmzoo args` in this process

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! ünïcode 日本"}, {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": " 4 "}]
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """A byte-level BPE with the chat templates' control tokens as special tokens."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    inner = HF(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    texts = [json.dumps(record) for record in make_records(300)] + [m["content"] for m in CHAT]
    inner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(inner)


def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ====================================================================== formats and their errors
@pytest.mark.parametrize("record, messages", [
    ({"prompt": "a", "response": "b"}, [("user", "a"), ("assistant", "b")]),
    ({"prompt": "a", "completion": "b", "system": "s"}, [("system", "s"), ("user", "a"), ("assistant", "b")]),
    ({"instruction": "a", "input": "x", "output": "b"}, [("user", "a\n\nx"), ("assistant", "b")]),
    ({"instruction": "a", "input": "", "output": "b"}, [("user", "a"), ("assistant", "b")]),
    ({"messages": CHAT}, [(m["role"], m["content"]) for m in CHAT]),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_formats_are_detected_per_file(tmp_path, record, messages, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text(json.dumps([record, record]) if suffix == ".json" else f"{json.dumps(record)}\n\n{json.dumps(record)}\n")
    assert read_records(path) == [[{"role": r, "content": c} for r, c in messages]] * 2


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": "b",}'], "line 2: not valid JSON"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], "line 2: a prompt/response record needs the keys"),
    (['{"question": "a"}'], "line 1: not a record of a known format"),
    (['{"messages": [{"role": "user", "content": "a"}]}'], "line 1: the conversation has no assistant turn"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}'],
     "line 1: message 2 has the unknown role 'bot'"),
    (['{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]}'],
     "line 1: message 1 (user) has no text content"),
])
def test_a_malformed_record_is_a_one_line_error_naming_its_line(tmp_path, lines, message):
    with pytest.raises(ValueError) as error:
        read_records(write(tmp_path / "bad.jsonl", lines))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_template_that_fails_is_a_one_line_error():
    failing = ChatTemplate("{{ raise_exception('only user and assistant roles') }}", "custom")
    with pytest.raises(ValueError, match="chat template custom fails to render .only user and assistant roles"):
        failing.render(CHAT)
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}", "broken")
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}", "escape")
    with pytest.raises(ValueError, match="fails to render"):
        sandboxed.render(CHAT)


# ====================================================================== templates and masks against transformers
def hf_tokenizer(tokenizer):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer, bos_token="<|bos|>",
                                                eos_token="<|eos|>", pad_token="<|pad|>")


@pytest.mark.parametrize("name", TEMPLATES)
def test_rendering_and_masks_match_transformers_apply_chat_template(tokenizer, name):
    """The built-in templates mark assistant turns with {% generation %} blocks, as transformers reads them; the same
    template without the blocks finds the turns by rendering each beginning of the conversation: both must give
    transformers' own text, tokens and assistant mask."""
    reference = hf_tokenizer(tokenizer)
    marked = ChatTemplate(TEMPLATES[name], name, **tokenizer.special_tokens)
    plain = ChatTemplate(without_generation_blocks(TEMPLATES[name]), name, **tokenizer.special_tokens)
    assert marked.has_generation_blocks and not plain.has_generation_blocks
    for prompt in (False, True):  # the same text, with and without the generation prompt
        messages = CHAT[:4] if prompt else CHAT
        expected = reference.apply_chat_template(messages, chat_template=TEMPLATES[name], tokenize=False,
                                                 add_generation_prompt=prompt)
        assert marked.render(messages, add_generation_prompt=prompt) == expected
        assert plain.render(messages, add_generation_prompt=prompt) == expected
    hf = reference.apply_chat_template(CHAT, chat_template=TEMPLATES[name], return_dict=True,
                                       return_assistant_tokens_mask=True)
    for template in (marked, plain):
        data = SFTDataModule(tokenizer="unused", template=name, seq_len=256)
        data.tokenizer, data.chat_template = tokenizer, template  # found without any file
        (ids, labels), = data.encode([CHAT])[0]
        assert ids.tolist() == hf["input_ids"]  # the same tokens, special ones included
        assert (labels != -100).astype(int).tolist() == hf["assistant_masks"]  # every assistant turn, nothing else
        assert labels[labels != -100].tolist() == ids[np.array(hf["assistant_masks"], bool)].tolist()
        answers = tokenizer.decode(ids[labels != -100], skip_special_tokens=False)
        assert "Hello" in answers and "4" in answers and "Hi there" not in answers and "Be brief" not in answers


def test_templates_of_a_hugging_face_directory_are_read(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>", "bos_token": "<|bos|>",
                                                                 "chat_template": TEMPLATES["llama3"]}))
    data = SFTDataModule(tokenizer=str(tmp_path))
    assert data.chat_template.source == TEMPLATES["llama3"] and data.chat_template.end_of_turn == "<|eot_id|>"
    (tmp_path / "chat_template.jinja").write_text(TEMPLATES["chatml"])
    assert SFTDataModule(tokenizer=str(tmp_path)).chat_template.end_of_turn == "<|im_end|>"


def test_the_loss_gradient_on_prompt_logits_is_exactly_zero(tokenizer):
    data = SFTDataModule(tokenizer="unused", template="chatml", seq_len=256)
    data.tokenizer = tokenizer
    examples, _, _ = data.encode([CHAT, CHAT[:3]])
    batch = ExampleBatches(examples, 2, tokenizer.pad_token_id, shuffle=False).collate(np.arange(2))
    model = Llama(vocab_size=tokenizer.vocab_size, embed_dim=32, num_heads=4, num_layers=2, max_position_embeddings=256)
    inputs, targets, mask = model.split_batch(batch)
    logits = model(inputs, mask)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    loss.backward()
    masked = targets == -100
    assert masked.any() and (~masked).any()
    assert torch.count_nonzero(logits.grad[masked]) == 0  # exactly zero: prompt and padding
    assert torch.all(logits.grad[~masked].abs().sum(-1) > 0)
    assert torch.allclose(model.token_nll(batch)[0], loss, atol=1e-6)  # the fused loss is the same loss
    hidden = []

    def keep(module, args, out):
        out.retain_grad()
        hidden.append(out)

    model.norm.register_forward_hook(keep)
    model.zero_grad()
    model.token_nll(batch)[0].backward()
    assert torch.count_nonzero(hidden[0].grad[masked]) == 0


def test_overlong_examples_are_truncated_or_dropped_with_a_count(tokenizer):
    data = SFTDataModule(tokenizer="unused", template="chatml", seq_len=16)
    data.tokenizer = tokenizer
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 40}]
    long_prompt = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "yes"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    examples, truncated, dropped = data.encode([long_answer, long_prompt, short])
    assert (truncated, dropped) == (1, 1) and len(examples) == 2 and all(len(ids) <= 17 for ids, _ in examples)
    assert (examples[0][1] != -100).any()
    drop = SFTDataModule(tokenizer="unused", template="chatml", seq_len=16, overlong="drop")
    drop.tokenizer = tokenizer
    assert drop.encode([long_answer, long_prompt])[1:] == (0, 2)


def test_batches_are_seeded_padded_and_resume_exactly():
    examples = [(np.arange(n) + 10, np.where(np.arange(n) % 2, np.arange(n) + 10, -100)) for n in range(3, 23)]
    loader = ExampleBatches(examples, 4, pad_token_id=0, shuffle=True, seed=3)
    first = [batch for _, batch in zip(range(12), loader)]  # past an epoch (5 batches)
    assert len(loader) == 5
    for batch in first:
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == lengths.max()  # padded to the longest row
        assert torch.all(batch["labels"][batch["attention_mask"] == 0] == -100)
    epoch = torch.cat([b["input_ids"][:, 0] for b in first[:5]])
    assert sorted(epoch.tolist()) == sorted([10] * 20)  # every example once per epoch (their first token: 10)
    resumed = ExampleBatches(examples, 4, pad_token_id=0, shuffle=True, seed=3, progress=Progress(batches=7))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first[7:10], resumed))
    ranks = [[b["attention_mask"].sum(1).tolist() for b in ExampleBatches(examples, 2, 0, True, 3, rank, 2)]
             for rank in (0, 1)]
    assert not set(sum(ranks[0], [])) & set(sum(ranks[1], []))  # each example on one rank
    order = ExampleBatches(examples, 4, 0, shuffle=False)
    assert [len(b["input_ids"]) for b in order] == [4] * 5


def test_the_held_back_stream_never_prints_the_end_of_turn_marker():
    held = HeldBack("<|im_end|>")
    assert held.push("Hello <|im") + held.push("_e") + held.push("nd|>\nmore") + held.flush() == "Hello "
    held = HeldBack("<|im_end|>")
    assert held.push("a <") + held.push("b") + held.flush() == "a <b"


# ====================================================================== the command line
@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    """A tiny pretrained Llama checkpoint with its tokenizer inside, and instruction data."""
    tmp = tmp_path_factory.mktemp("sft")
    model = Llama(vocab_size=tokenizer.vocab_size, embed_dim=32, num_heads=4, num_kv_heads=2, num_layers=2,
                  max_position_embeddings=128)
    save_checkpoint({**lightning_checkpoint(model), "tokenizer": tokenizer.state_dict()}, tmp / "base.ckpt")
    train, test = write_instructions(tmp, train=64, test=8)
    return SimpleNamespace(dir=tmp, ckpt=tmp / "base.ckpt", train=train, test=test, model=model)


FAST = ["--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false", "--data.batch_size", "4"]


@pytest.fixture(scope="module")
def lora_run(base) -> Path:
    """`llmzoo fit --config configs/sft-lora.yaml --model.pretrained base.ckpt` for 3 steps: its last checkpoint."""
    from llmzoo.cli import main

    root = base.dir / "lora"
    try:
        main([str(arg) for arg in ("fit", "--config", CONFIGS / "sft-lora.yaml", "--model.pretrained", base.ckpt,
                                   "--data.path", base.train, "--trainer.default_root_dir", root, *FAST)])
    except SystemExit as exit_:
        assert not exit_.code, exit_.code
    return root / "checkpoints" / "last.ckpt"


def test_fit_lora_from_a_pretrained_checkpoint_then_chat(capsys, base, lora_run):
    root = lora_run.parents[1]
    checkpoint = torch.load(lora_run, weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["pretrained"] == str(base.ckpt) and hparams["lora"]["r"] == 16 and hparams["embed_dim"] == 32
    assert checkpoint["SFTDataModule"]["chat_template"] == TEMPLATES["alpaca"]
    trained = Llama.load_from_checkpoint(root / "checkpoints" / "last.ckpt")
    assert all(torch.equal(p, base.model.state_dict()[n]) for n, p in trained.state_dict().items()
               if n in base.model.state_dict())  # the base is frozen
    assert any(p.abs().sum() > 0 for n, p in lora_state_dict(trained).items() if ".B." in n)  # the adapters learnt
    result = llmzoo(capsys, "generate", "--ckpt_path", root / "checkpoints" / "last.ckpt", "--chat", "--prompt",
                    "Repeat twice: king", "--system", "Be brief.", "--do_sample", "false", "--max_new_tokens", "8")
    assert result.code == 0, result.err[-3000:]
    assert "### Instruction" not in result.out and "<|eos|>" not in result.out
    output = io.StringIO()
    history = chat(str(root / "checkpoints" / "last.ckpt"), system="Be brief.", do_sample=False, max_new_tokens=6,
                   input=io.StringIO("Repeat twice: king\n/reset\nWhat is the first word of: love hope\n"),
                   output=output)
    assert [m["role"] for m in history] == ["system", "user", "assistant"]  # /reset kept the system message only
    assert "(the conversation starts over)" in output.getvalue()


def test_full_fine_tuning_with_the_sft_preset_prints_every_setting(capsys, base):
    result = llmzoo(capsys, "fit", "--config", CONFIGS / "sft.yaml", "--model.pretrained", base.ckpt, "--data.path",
                    base.train, "--print_config")
    assert result.code == 0, result.err[-3000:]
    import yaml

    config = yaml.safe_load(result.out)
    assert config["model"]["class_path"] == "llmzoo.models.llama.Llama"
    assert config["model"]["init_args"]["embed_dim"] == 32 and config["model"]["init_args"]["lora"] is None
    assert config["data"]["init_args"]["mask_prompt"] is True and config["data"]["init_args"]["template"] == "alpaca"


@pytest.mark.parametrize("args, message", [
    (["--model.pretrained", "missing.ckpt"], "--model.pretrained missing.ckpt does not exist"),
    (["--model", "GPT2", "--model.pretrained", "{ckpt}"], "holds a Llama model, not a"),
    (["--model.pretrained", "{ckpt}", "--model.embed_dim", "64"], "--model.embed_dim=64 (pretrained: 32) differs"),
    (["--model.pretrained", "{ckpt}", "--model.lora.r", "0"], "r must be a positive integer"),
    (["--model.pretrained", "{ckpt}", "--data.path", "{no_assistant}"], "line 2: the conversation has no assistant"),
    (["--model.pretrained", "{ckpt}", "--data.template", "{failing}"], "fails to render (no system messages)"),
])
def test_bad_fine_tuning_input_is_one_line_and_writes_nothing(capsys, base, tmp_path, args, message):
    root = tmp_path / "run"
    write(tmp_path / "bad.jsonl", ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
                                   '{"messages": [{"role": "user", "content": "a"}]}'])
    (tmp_path / "failing.jinja").write_text("{{ raise_exception('no system messages') }}")
    paths = {"{ckpt}": base.ckpt, "{no_assistant}": tmp_path / "bad.jsonl", "{failing}": tmp_path / "failing.jinja"}
    args = [str(paths.get(arg, arg)) for arg in args]
    result = llmzoo(capsys, "fit", "--config", CONFIGS / "sft.yaml", "--data.path", base.train,
                    "--trainer.default_root_dir", root, *args, *FAST)
    assert result.code == 1 and message in result.err, result.err[-2000:]
    assert len(result.err.strip().splitlines()[-1]) > 0 and result.err.strip().splitlines()[-1].startswith("llmzoo: error")
    assert not root.exists()


def test_convert_exports_a_lora_run_as_peft_and_merged(capsys, base, lora_run, tmp_path):
    last = lora_run
    assert llmzoo(capsys, "convert", "--ckpt_path", last, "--to_peft", tmp_path / "peft").code == 0
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.ckpt)
    assert llmzoo(capsys, "convert", "--ckpt_path", last, "--to_hf", tmp_path / "merged").code == 0
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == TEMPLATES["alpaca"]  # for apply_chat_template
    assert llmzoo(capsys, "convert", "--ckpt_path", base.ckpt, "--to_hf", tmp_path / "base").code == 0
    assert llmzoo(capsys, "convert", "--from_hf", tmp_path / "base", "--from_peft", tmp_path / "peft", "--to_hf",
                  tmp_path / "again").code == 0
    from llmzoo.hf import from_hf

    ids = torch.randint(0, 300, (1, 12))
    trained = Llama.load_from_checkpoint(last).eval()
    for directory in ("merged", "again"):
        assert (from_hf(tmp_path / directory)(ids) - trained(ids)).abs().max() <= 1e-5


def test_fit_from_a_hugging_face_directory_takes_its_tokenizer_and_template(capsys, base, tmp_path, tokenizer):
    from llmzoo.hf import to_hf

    to_hf(base.model, tmp_path / "hf", tokenizer)
    (tmp_path / "hf" / "chat_template.jinja").write_text(TEMPLATES["llama3"])
    root = tmp_path / "run"
    result = llmzoo(capsys, "fit", "--config", CONFIGS / "sft.yaml", "--model.pretrained", tmp_path / "hf",
                    "--data.path", base.train, "--data.template", "null", "--trainer.default_root_dir", root, *FAST)
    assert result.code == 0, result.err[-3000:]
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["SFTDataModule"]["chat_template"] == TEMPLATES["llama3"]
    assert checkpoint["datamodule_hyper_parameters"]["tokenizer"] == str(tmp_path / "hf")
    assert checkpoint["hyper_parameters"]["vocab_size"] == base.model.hparams.vocab_size


def test_load_pretrained_builds_the_stored_model_with_fresh_settings(base):
    from llmzoo.lora import LoRASettings
    from llmzoo.pretrained import load_pretrained

    model = load_pretrained(base.ckpt, lora=LoRASettings(r=4), learning_rate=1e-4).eval()
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(model(ids), base.model.eval()(ids))  # the stored weights; fresh adapters change nothing
    assert model.hparams.learning_rate == 1e-4 and model.hparams.pretrained == str(base.ckpt)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state_dict(model))
    with pytest.raises(ValueError, match="holds a Llama model, not a GPT2"):
        load_pretrained(base.ckpt, model_class="GPT2")
