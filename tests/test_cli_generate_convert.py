"""``llmzoo generate`` (every decoding flag, batches, speculative decoding, stop strings, errors) and ``llmzoo
convert`` run in this process through ``main``; then the Hugging Face end to end: a model trained with
``llmzoo fit`` on tinyshakespeare, exported with ``llmzoo convert``, gives the same greedy text in
``transformers.pipeline`` as in ``llmzoo generate``."""

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_model

from llmzoo.cli import gather_lists, main
from llmzoo.data import Tokenizer, load_tokenizer_for_checkpoint
from llmzoo.generation import generate, left_pad
from llmzoo.hf import convert_hf_to_checkpoint, load_checkpoint_model, to_hf

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
        "arrows of outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. ")
PROMPTS = ["To be", "the slings and arrows of", "Whether"]


def llmzoo(capsys, *args) -> SimpleNamespace:
    """``llmzoo args`` in this process: its exit code, stdout and stderr (a ``sys.exit(message)`` is code 1)."""
    code = 0
    try:
        main([str(arg) for arg in args])
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    if isinstance(code, str):
        code, err = 1, err + code + "\n"
    return SimpleNamespace(code=code, out=out, err=err)


def generate_cli(capsys, ckpt, *args) -> SimpleNamespace:
    result = llmzoo(capsys, "generate", "--ckpt_path", ckpt, *args)
    assert result.code == 0, result.err[-3000:]
    return result


def rows(out: str) -> dict[str, str]:
    """The rows of a batch's output by label (``prompt 2, sample 1``): prompt + continuation."""
    parts = re.split(r"(?m)^----- (.+) -----\n", out)
    return {label: text[:-1] for label, text in zip(parts[1::2], parts[2::2])}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Tiny Llamas (random weights) sharing a byte-level BPE: the target and a 1-layer draft, as Hugging Face
    directories and as checkpoints converted from them; and a model with another tokenizer."""
    tmp = tmp_path_factory.mktemp("zoo")
    tokenizer = Tokenizer.train_bpe([TEXT] * 10, vocab_size=300)
    other = Tokenizer.train_bpe([TEXT[::-1]] * 10, vocab_size=300)
    torch.manual_seed(0)
    models = {"target": (tiny_model("Llama", vocab_size=tokenizer.vocab_size), tokenizer),
              "draft": (tiny_model("Llama", vocab_size=tokenizer.vocab_size, num_layers=1), tokenizer),
              "other": (tiny_model("Llama", vocab_size=other.vocab_size, num_layers=1), other)}
    paths = {}
    for name, (model, model_tokenizer) in models.items():
        to_hf(model, tmp / name, model_tokenizer)
        paths[name] = convert_hf_to_checkpoint(tmp / name, tmp / f"{name}.ckpt")
    return SimpleNamespace(tmp=tmp, tokenizer=tokenizer, hf=tmp / "target", **paths)


def library_text(zoo, prompts: list[str], **options) -> list[str]:
    """What ``llmzoo.generation.generate`` continues ``prompts`` with (one left-padded batch), eos stopping rows."""
    tokenizer = zoo.tokenizer
    input_ids, mask = left_pad([tokenizer.encode(p) for p in prompts], tokenizer.pad_token_id)
    output = generate(load_checkpoint_model(zoo.target), input_ids, attention_mask=mask, decode=tokenizer.decode,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **options)
    return [tokenizer.decode(row[input_ids.shape[1]:].tolist()) for row in output]


# ---------------------------------------------------------------------------------------- generate
def test_greedy_streams_one_row_and_fits_the_context(zoo, capsys):
    result = generate_cli(capsys, zoo.target, "--prompt", "To be", "--do_sample", "false", "--max_new_tokens", "500")
    prompt_tokens = len(zoo.tokenizer.encode("To be"))
    assert f"max_new_tokens lowered from 500 to {64 - prompt_tokens}" in result.err
    (expected,) = library_text(zoo, ["To be"], max_new_tokens=64 - prompt_tokens)
    assert result.out == "To be" + expected + "\n"
    assert len(expected) > 0


def test_each_row_stops_at_end_of_sequence(zoo, capsys, tmp_path):
    """A model made to write eos where the target writes its 4th token for one of two prompts."""
    model, tokenizer, eos = load_checkpoint_model(zoo.target), zoo.tokenizer, zoo.tokenizer.eos_token_id
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    fourth = int(model.generate(ids, max_new_tokens=4)[0, -1])
    with torch.no_grad():
        model.lm_head.weight[eos] = 3 * model.lm_head.weight[fourth]
    to_hf(model, tmp_path / "hf", tokenizer)
    ckpt = convert_hf_to_checkpoint(tmp_path / "hf", tmp_path / "eos.ckpt")
    greedy = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--do_sample", "false", "--max_new_tokens", "20"]
    texts = rows(generate_cli(capsys, ckpt, *greedy).out)
    input_ids, mask = left_pad([tokenizer.encode(PROMPTS[0]), tokenizer.encode(PROMPTS[2])], tokenizer.pad_token_id)
    tokens = model.generate(input_ids, max_new_tokens=20, attention_mask=mask)[:, input_ids.shape[1]:].tolist()
    ends = [row.index(eos) if eos in row else len(row) for row in tokens]
    assert min(ends) < 20 and ends[0] != ends[1]  # rows end at eos, each at its own step
    assert texts == {f"prompt {i + 1}": prompt + tokenizer.decode(row[:end])
                     for i, (prompt, row, end) in enumerate(zip([PROMPTS[0], PROMPTS[2]], tokens, ends))}


@pytest.mark.parametrize("flags, options", [
    (["--num_beams", "3", "--length_penalty", "0.5", "--early_stopping", "true"],
     dict(num_beams=3, length_penalty=0.5, early_stopping=True)),
    (["--num_beams", "2", "--early_stopping", "never", "--repetition_penalty", "1.5"],
     dict(num_beams=2, early_stopping="never", repetition_penalty=1.5)),
    (["--do_sample", "true", "--temperature", "0.7", "--top_k", "40", "--top_p", "0.9", "--min_p", "0.01",
      "--repetition_penalty", "1.2", "--seed", "3"],
     dict(do_sample=True, temperature=0.7, top_k=40, top_p=0.9, min_p=0.01, repetition_penalty=1.2, seed=3)),
])
def test_decoding_flags_reach_the_decoder(zoo, capsys, flags, options):
    result = generate_cli(capsys, zoo.target, "--prompt", "To be", "--max_new_tokens", "12", *flags)
    assert result.out == "To be" + library_text(zoo, ["To be"], max_new_tokens=12, **options)[0] + "\n"


def test_samples_are_one_seeded_batch(zoo, capsys):
    flags = ["--prompt", "To be", "--max_new_tokens", "12", "--num_samples", "3", "--top_k", "null"]
    texts = rows(generate_cli(capsys, zoo.target, *flags, "--seed", "5").out)
    assert list(texts) == ["sample 1", "sample 2", "sample 3"]
    expected = library_text(zoo, ["To be"] * 3, max_new_tokens=12, do_sample=True, temperature=0.8, seed=5)
    assert list(texts.values()) == ["To be" + text for text in expected]
    assert len(set(texts.values())) == 3  # samples differ
    assert rows(generate_cli(capsys, zoo.target, *flags, "--seed", "5").out) == texts  # and repeat with the seed
    assert rows(generate_cli(capsys, zoo.target, *flags, "--seed", "6").out) != texts


def test_prompt_file_batch_equals_each_prompt_alone(zoo, capsys, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS[1:]) + "\n\n")  # a blank line is skipped
    greedy = ["--do_sample", "false", "--max_new_tokens", "10"]
    batch = rows(generate_cli(capsys, zoo.target, "--prompt", PROMPTS[0], "--prompt_file", prompt_file, *greedy).out)
    alone = [generate_cli(capsys, zoo.target, "--prompt", prompt, *greedy).out[:-1] for prompt in PROMPTS]
    assert batch == {f"prompt {i + 1}": text for i, text in enumerate(alone)}
    repeated = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], f"--prompt={PROMPTS[2]}"]  # repeated options
    assert rows(generate_cli(capsys, zoo.target, *repeated, *greedy).out) == batch


@pytest.mark.parametrize("draft", ["draft", "draft_hf"])
def test_speculative_decoding_with_a_draft_equals_target_greedy(zoo, capsys, draft):
    draft_path = zoo.draft if draft == "draft" else zoo.tmp / "draft"
    greedy = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--do_sample", "false", "--max_new_tokens", "20"]
    alone = generate_cli(capsys, zoo.target, *greedy).out
    drafted = generate_cli(capsys, zoo.target, *greedy, "--draft_ckpt_path", draft_path, "--num_draft_tokens", "3")
    assert drafted.out == alone


def test_stop_strings_end_each_row(zoo, capsys):
    greedy = ["--do_sample", "false", "--max_new_tokens", "30"]
    full = rows(generate_cli(capsys, zoo.target, "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], *greedy).out)
    continuation = full["prompt 1"][len(PROMPTS[0]):]
    stop = continuation[8:11]  # a piece of row 1's text, 3 characters long
    assert len(stop) == 3 and "\n" not in stop
    stopped = rows(generate_cli(capsys, zoo.target, "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], *greedy,
                                "--stop", stop, "--stop", "\x00never").out)
    first = stopped["prompt 1"]
    assert full["prompt 1"].startswith(first) and stop in first[len(PROMPTS[0]):]
    end = len(PROMPTS[0]) + continuation.index(stop) + len(stop)  # the token that completes the stop string is kept
    assert end <= len(first) < end + max(len(zoo.tokenizer.decode([i])) for i in range(zoo.tokenizer.vocab_size))
    other = full["prompt 2"][len(PROMPTS[2]):]
    assert stopped["prompt 2"] == full["prompt 2"] or stop in other  # row 2 stops only on its own


def test_generate_from_a_hugging_face_directory_equals_the_checkpoint(zoo, capsys):
    greedy = ["--prompt", PROMPTS[1], "--do_sample", "false", "--max_new_tokens", "16"]
    assert generate_cli(capsys, zoo.hf, *greedy).out == generate_cli(capsys, zoo.target, *greedy).out


@pytest.mark.parametrize("flags, message", [
    (["--max_new_tokens", "0"], "max_new_tokens must be a positive integer, got 0"),
    (["--top_p", "1.5"], r"top_p must be in \(0, 1\], got 1.5"),
    (["--do_sample", "true", "--temperature", "0"], "temperature must be > 0 when sampling"),
    (["--num_beams", "2", "--do_sample", "true"], "beam search with do_sample=True"),
    (["--num_samples", "0"], "num_samples must be >= 1"),
    (["--prompt", "zq" * 60], r"the prompt has \d+ tokens, but the model's context of 64 tokens must hold it and at least one new token: "
                                r"shorten the prompt to at most 63"),
    (["--prompt_file", "missing.txt"], "prompt file missing.txt not found"),
    (["--draft_ckpt_path", "OTHER"], "the draft model .* was trained with another tokenizer"),
])
def test_bad_flags_are_one_line_errors(zoo, capsys, flags, message):
    flags = [str(zoo.other) if flag == "OTHER" else flag for flag in flags]
    result = llmzoo(capsys, "generate", "--ckpt_path", zoo.target, *flags)
    assert result.code == 1 and result.out == ""
    last = result.err.strip().splitlines()[-1]
    assert re.match(f"llmzoo: error: {message}", last), last
    assert "Traceback" not in result.err


def test_repeated_options_are_gathered_literally():
    args = ["generate", "--prompt", "a", "--top_k", "5", "--prompt=[\"b\"]", "--stop", "\n", "--prompt"]
    assert gather_lists(args, ("--prompt", "--stop")) == [
        "generate", '--prompt=["a", "[\\"b\\"]"]', "--top_k", "5", '--stop=["\\n"]', "--prompt"]


# ---------------------------------------------------------------------------------------- convert
def test_convert_both_ways(zoo, capsys, tmp_path):
    result = llmzoo(capsys, "convert", "--ckpt_path", zoo.target, "--to_hf", tmp_path / "hf", "--dtype", "bfloat16",
                    "--max_shard_size", "20KB")
    assert result.code == 0 and result.out == f"wrote {tmp_path / 'hf'}\n"
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1
    with safe_open(shards[0], "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    assert load_tokenizer_for_checkpoint(tmp_path / "hf") == zoo.tokenizer  # the run's tokenizer goes along
    assert llmzoo(capsys, "convert", "--from_hf", tmp_path / "hf", "--to", tmp_path / "back.ckpt").code == 0
    assert load_tokenizer_for_checkpoint(tmp_path / "back.ckpt") == zoo.tokenizer  # inside the checkpoint
    back, original = load_checkpoint_model(tmp_path / "back.ckpt"), load_checkpoint_model(zoo.target)
    assert back.embed.weight.dtype == torch.bfloat16
    for name, tensor in original.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor.to(torch.bfloat16)), name
    again = llmzoo(capsys, "convert", "--from_hf", tmp_path / "hf", "--to", tmp_path / "back.ckpt")
    assert again.code == 1 and again.err.endswith("exists: pass overwrite=True (--overwrite true) or choose another path\n")
    assert llmzoo(capsys, "convert", "--from_hf", tmp_path / "hf", "--to", tmp_path / "back.ckpt",
                  "--overwrite", "true").code == 0


@pytest.mark.parametrize("args, message", [
    (["--from_hf", "HF"], "convert needs --from_hf DIR --to CKPT"),
    (["--ckpt_path", "CKPT", "--to_hf", "OUT", "--to", "x.ckpt"], "convert needs --from_hf DIR --to CKPT"),
    (["--from_hf", "MISSING", "--to", "x.ckpt"], "missing is not a directory"),
    (["--ckpt_path", "CKPT", "--to", "x.ckpt"], "is not a sharded checkpoint: --ckpt_path --to makes one file"),
])
def test_convert_errors(zoo, capsys, tmp_path, args, message):
    paths = {"HF": zoo.hf, "CKPT": zoo.target, "OUT": tmp_path / "out", "MISSING": tmp_path / "missing"}
    result = llmzoo(capsys, "convert", *[paths.get(arg, arg) for arg in args])
    assert result.code == 1 and message in result.err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.ckpt").exists()


def test_help_lists_convert_and_the_other_subcommands_refuse_what_they_cannot_use(zoo, capsys):
    assert "{fit,validate,test,predict,generate,convert,evaluate" in llmzoo(capsys, "--help").out  # chat, ... after
    result = llmzoo(capsys, "validate", "--ckpt_path", zoo.hf)
    assert result.code == 1
    assert result.err.strip().endswith(f"validate needs a Lightning checkpoint: llmzoo convert --from_hf {zoo.hf} "
                                       f"--to model.ckpt")
    result = llmzoo(capsys, "fit", "--model", "Llama")  # --data is optional for generate only
    assert result.code == 1 and result.err.strip().endswith("fit needs data: --data TextDataModule --data.path "
                                                            "<your texts> (or a --config that has a data section)")


# ---------------------------------------------------------------------------------------- Hugging Face end to end
def test_trained_model_exported_to_hugging_face_generates_the_same_greedy_text(shakespeare, capsys, tmp_path,
                                                                              monkeypatch):
    """fit (a subprocess) on tinyshakespeare with a byte-level BPE -> convert --to_hf -> transformers' pipeline
    greedy text == llmzoo generate's, from the checkpoint and from the exported directory; the directory
    converted back validates to the same loss and fine-tunes."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # validate's default run directory (runs/) lands here, not in the repository
    run = tmp_path / "run"
    data = ["--data", "TextDataModule", "--data.path", shakespeare, "--data.cache_dir", tmp_path / "cache",
            "--data.seq_len", "64", "--data.batch_size", "16"]
    fit = subprocess.run(
        [sys.executable, "-m", "llmzoo", "fit", "--model", "Llama", "--model.embed_dim", "64", "--model.num_heads", "4",
         "--model.num_kv_heads", "2", "--model.num_layers", "2", "--model.max_position_embeddings", "128",
         "--model.learning_rate", "3e-3", "--model.warmup_steps", "10", *map(str, data), "--data.tokenizer", "bpe",
         "--data.bpe_vocab_size", "512", "--trainer.max_steps", "200", "--trainer.val_check_interval", "200",
         "--trainer.limit_val_batches", "4", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(run)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert llmzoo(capsys, "convert", "--ckpt_path", ckpt, "--to_hf", tmp_path / "hf").code == 0

    prompt, new = "ROMEO:\nI will", 40
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    tokenizer = load_tokenizer_for_checkpoint(ckpt)
    assert hf_tokenizer(prompt)["input_ids"] == tokenizer.encode(prompt)  # no bos added by either
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    pipeline = transformers.pipeline("text-generation", model=str(tmp_path / "hf"), device="cpu")
    expected = pipeline(prompt, max_new_tokens=new, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert len(set(expected.split())) > 3  # words, not one token repeated: the model learned something
    greedy = ["--prompt", prompt, "--do_sample", "false", "--max_new_tokens", str(new)]
    assert generate_cli(capsys, ckpt, *greedy).out == prompt + expected + "\n"
    assert generate_cli(capsys, tmp_path / "hf", *greedy).out == prompt + expected + "\n"

    assert llmzoo(capsys, "convert", "--from_hf", tmp_path / "hf", "--to", tmp_path / "imported.ckpt").code == 0
    validate = ["--trainer.limit_val_batches", "4", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    original = llmzoo(capsys, "validate", "--ckpt_path", ckpt, *validate)
    imported = llmzoo(capsys, "validate", "--ckpt_path", tmp_path / "imported.ckpt", *map(str, data), *validate)
    assert original.code == imported.code == 0, imported.err[-3000:]
    losses = [float(re.search(r"val/loss\s*│\s*([\d.]+)", result.out).group(1)) for result in (original, imported)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    tuned = llmzoo(capsys, "fit", "--ckpt_path", tmp_path / "imported.ckpt", *map(str, data), "--trainer.max_steps", "2",
                   "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", tmp_path / "tuned", *validate[2:])
    assert tuned.code == 0, tuned.err[-3000:]
    assert torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3"])
def test_exported_new_family_converts_back_and_fine_tunes(family, capsys, tmp_path, monkeypatch):
    """A Qwen model exported as a Hugging Face directory, read back with ``llmzoo convert --from_hf`` and
    trained on with ``llmzoo fit``: the architecture, its settings and the tokenizer come from the checkpoint."""
    monkeypatch.chdir(tmp_path)
    tokenizer = Tokenizer.train_bpe([TEXT] * 10, vocab_size=300)
    model = tiny_model(family, vocab_size=tokenizer.vocab_size)
    to_hf(model, tmp_path / "hf", tokenizer)
    assert llmzoo(capsys, "convert", "--from_hf", tmp_path / "hf", "--to", tmp_path / "model.ckpt").code == 0
    assert type(load_checkpoint_model(tmp_path / "model.ckpt")) is type(model)
    (tmp_path / "corpus.txt").write_text(TEXT * 40)
    tuned = llmzoo(capsys, "fit", "--ckpt_path", tmp_path / "model.ckpt", "--data", "TextDataModule",
                   "--data.path", tmp_path / "corpus.txt", "--data.cache_dir", tmp_path / "cache", "--data.seq_len",
                   "16", "--data.batch_size", "4", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
                   "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
                   "--trainer.default_root_dir", tmp_path / "tuned")
    assert tuned.code == 0, tuned.err[-3000:]
    trained = load_checkpoint_model(tmp_path / "tuned" / "checkpoints" / "last.ckpt")
    def settings(m):  # as recorded, head_dim resolved (config.json always states it)
        return {**{k: list(v) if isinstance(v, tuple) else v for k, v in m.hparams.items()}, "head_dim": m.head_dim}

    assert type(trained) is type(model) and settings(trained) == settings(model)
    assert not torch.equal(trained.blocks[0].attention.qkv.weight, model.blocks[0].attention.qkv.weight)


def test_a_plain_trainer_checkpoint_generates(capsys, tmp_path):
    """A checkpoint of a stock ``Llama`` written by ``lightning.Trainer`` (no LightningCLI class path in its
    hyperparameters): the CLI takes the architecture llmzoo records and the tokenizer the datamodule kept; and
    ``--ckpt_path last`` finds it in a run directory."""
    import lightning as L

    from llmzoo import Llama
    from llmzoo.data import TextDataModule

    (tmp_path / "corpus.txt").write_text(TEXT * 20)
    data = TextDataModule(str(tmp_path / "corpus.txt"), tokenizer="char", seq_len=16, batch_size=4,
                          cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    data.setup("fit")
    model = Llama(vocab_size=data.vocab_size, embed_dim=32, num_heads=4, num_layers=1, max_position_embeddings=64)
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                        limit_val_batches=0, enable_model_summary=False)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    out = generate_cli(capsys, tmp_path / "plain.ckpt", "--prompt", "To be", "--max_new_tokens", "6",
                       "--do_sample", "false").out
    ids = data.tokenizer.encode("To be")
    eos = data.tokenizer.eos_token_id
    expected = generate(model.eval(), torch.tensor([ids]), max_new_tokens=6, eos_token_id=eos)[0, len(ids):].tolist()
    assert out == "To be" + data.tokenizer.decode([i for i in expected if i != eos]) + "\n"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes((tmp_path / "plain.ckpt").read_bytes())
    assert generate_cli(capsys, "last", "--trainer.default_root_dir", tmp_path / "run", "--prompt", "To be",
                        "--max_new_tokens", "6", "--do_sample", "false").out == out  # the run's last checkpoint
