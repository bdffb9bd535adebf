"""Preference tuning (DPO, IPO, SimPO): the objective against TRL's DPOTrainer, the pair batches, the frozen
reference (precomputed, a frozen copy, LoRA's adapters switched off), bad input as one line, and `llmzoo fit` on a
tiny pretrained model with an exact resume; the demonstration end to end (slow)."""

import json
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from llmzoo import Llama
from llmzoo.checkpoints import save_checkpoint
from llmzoo.data import PreferenceDataModule, Tokenizer
from llmzoo.data.datasets import Progress
from llmzoo.data.instructions import MARK, make_pairs, write_instructions, write_jsonl
from llmzoo.data.preference import PairBatches, read_pairs
from llmzoo.hf import lightning_checkpoint
from llmzoo.layers.preference import PreferenceSettings, completion_logps, preference_loss
from llmzoo.pretrained import load_pretrained
from test_cli_generate_convert import llmzoo  # `llmzoo args` in this process
from tiny import TINY_CONFIGS, tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    inner = HF(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.train_from_iterator([json.dumps(r) for r in make_pairs(300)], trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(inner)


def data_module(tokenizer, path=None, **kwargs) -> PreferenceDataModule:
    data = PreferenceDataModule(path=None if path is None else str(path), tokenizer="unused",
                                **{"template": "alpaca", "seq_len": 128, "batch_size": 4, **kwargs})
    data.tokenizer = tokenizer  # found without any file
    return data


# ====================================================================== the objective
def test_completion_logps_are_the_full_log_softmax_summed_over_completion_tokens():
    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 7, 16, requires_grad=True), torch.randn(50, 16)
    targets = torch.randint(0, 50, (4, 7)).masked_fill(torch.rand(4, 7) < 0.4, -100)
    sums, counts = completion_logps(hidden, weight, targets)
    full = (hidden @ weight.t()).log_softmax(-1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    assert torch.allclose(sums, (full * (targets != -100)).sum(1), atol=1e-5)
    assert counts.tolist() == (targets != -100).sum(1).tolist()
    sums.sum().backward()
    assert torch.count_nonzero(hidden.grad[targets == -100]) == 0  # prompt and padding get no gradient


def test_label_smoothing_is_the_loss_expected_over_flipped_labels_and_simpo_is_length_normalised():
    torch.manual_seed(0)
    policy, reference, tokens = torch.randn(2, 5) * 5, torch.randn(2, 5) * 5, torch.randint(1, 9, (2, 5)).float()
    smoothed = preference_loss(policy, reference, tokens, PreferenceSettings(label_smoothing=0.2))[0]
    plain = preference_loss(policy, reference, tokens, PreferenceSettings())[0]
    flipped = preference_loss(policy.flip(0), reference.flip(0), tokens.flip(0), PreferenceSettings())[0]
    assert torch.allclose(smoothed, 0.8 * plain + 0.2 * flipped)
    simpo = PreferenceSettings(loss_type="simpo", beta=2.0, gamma=0.5)
    losses, chosen, _ = preference_loss(policy, None, tokens, simpo)
    twice = preference_loss(2 * policy, None, 2 * tokens, simpo)  # the same log-probability per token
    assert torch.allclose(losses, twice[0]) and torch.allclose(chosen, twice[1])
    assert torch.allclose(losses, torch.nn.functional.softplus(-(2.0 * (policy[0] / tokens[0] - policy[1] / tokens[1])
                                                                 - 0.5)))


# ====================================================================== parity with TRL's DPOTrainer
@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory, tokenizer):
    """A tiny Llama built by transformers from a config (random weights), the same model in llmzoo (from_hf), and
    TRL's DPOTrainer over a few pairs."""
    trl = pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    from datasets import Dataset

    from llmzoo.hf import from_hf

    tmp = tmp_path_factory.mktemp("trl")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config).float()
    hf.save_pretrained(tmp / "reference")  # the reference; the policy is a step away from it
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    hf.save_pretrained(tmp / "hf")
    hf_tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.tokenizer, bos_token="<|bos|>",
                                                        eos_token="<|eos|>", pad_token="<|pad|>")
    pairs = make_pairs(6, seed=3)
    return SimpleNamespace(trl=trl, hf=hf, dir=tmp, tokenizer=hf_tokenizer, pairs=Dataset.from_list(pairs),
                           ours=from_hf(tmp / "hf"), reference=from_hf(tmp / "reference"), transformers=transformers)


def trl_trainer(setup, loss_type):
    ref = setup.transformers.LlamaForCausalLM.from_pretrained(setup.dir / "reference")
    args = setup.trl.DPOConfig(output_dir=str(setup.dir / "out"), report_to="none", loss_type=[loss_type], beta=0.1,
                               per_device_train_batch_size=6, use_cpu=True, disable_dropout=True, bf16=False)
    return setup.trl.DPOTrainer(model=setup.hf, ref_model=ref, args=args, train_dataset=setup.pairs,
                                processing_class=setup.tokenizer)


@pytest.mark.parametrize("loss_type, ours", [("sigmoid", "dpo"), ("ipo", "ipo")])
def test_loss_rewards_and_gradients_match_trl(trl_setup, loss_type, ours):
    from llmzoo.hf import convert_hf_state_dict

    trainer = trl_trainer(trl_setup, loss_type)
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    model = trl_setup.ours.float()
    model.hparams.preference = {**vars(PreferenceSettings(loss_type=ours))}
    worst = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0}
    for example in examples:  # one pair at a time: TRL's loss and rewards of that pair
        batch = trainer.data_collator([example])
        trainer._metrics["train"].clear()
        theirs = trainer.compute_loss(trl_setup.hf, batch).item()
        ours_batch = our_batch(batch, trl_setup.reference)
        losses, chosen, rejected = our_loss(model, ours_batch)
        metrics = trainer._metrics["train"]
        worst["loss"] = max(worst["loss"], abs(losses.item() - theirs))
        worst["chosen"] = max(worst["chosen"], abs(chosen.item() - metrics["rewards/chosen"][-1]))
        worst["rejected"] = max(worst["rejected"], abs(rejected.item() - metrics["rewards/rejected"][-1]))
    batch = trainer.data_collator(examples)  # all pairs: the gradient of the mean loss
    trl_setup.hf.zero_grad()
    trainer.compute_loss(trl_setup.hf, batch).backward()
    model.zero_grad()
    our_loss(model, our_batch(batch, trl_setup.reference))[0].mean().backward()
    grads = convert_hf_state_dict(tiny_twin(model), {n: p.grad for n, p in trl_setup.hf.named_parameters()})
    worst["gradient"] = max((grads[n] - p.grad).abs().max().item() for n, p in model.named_parameters())
    print(f"\n{ours}: max |llmzoo - TRL| {worst}")
    assert all(value <= 1e-5 for value in worst.values()), worst
    assert abs(chosen.item()) > 1e-3 and abs(losses.item() - np.log(2)) > 1e-4  # the policy is not the reference
    assert max(p.grad.abs().max().item() for p in model.parameters()) > 1e-3  # a gradient worth comparing


def our_batch(trl_batch: dict, reference) -> dict:
    """TRL's padded [chosen; rejected] batch as llmzoo's: labels -100 outside the completions, the reference log-
    probabilities precomputed by the llmzoo copy of TRL's reference model."""
    labels = trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100)
    batch = {"input_ids": trl_batch["input_ids"], "labels": labels, "attention_mask": trl_batch["attention_mask"],
             "pair_index": torch.arange(len(labels) // 2)}
    batch["reference_logps"] = reference.reference_logps(batch)
    return batch


def our_loss(model, batch):
    logps, tokens, _ = model.completion_logps(batch)
    return preference_loss(logps.view(2, -1), batch["reference_logps"], tokens.view(2, -1), model.preference_settings)


def tiny_twin(model):
    from llmzoo.models.build import empty_model

    return empty_model(type(model), {k: v for k, v in model.hparams.items() if k != "preference"})


# ====================================================================== the data
def test_a_pair_is_one_prompt_shared_by_two_completions_and_only_completions_count(tmp_path, tokenizer):
    records = [{"prompt": "Repeat twice: king", "chosen": "king king!", "rejected": "king king"},
               {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Hello"}]
    data = data_module(tokenizer, write_jsonl(records, tmp_path / "pairs.jsonl"), val_fraction=0.0, batch_size=2)
    data.load_examples()
    batch = PairBatches(data.train_examples, 2, data.pad_token_id, shuffle=False).collate(np.arange(2))
    assert batch["input_ids"].shape[0] == 4 and batch["pair_index"].tolist() == [0, 1]
    for pair, (prompt, chosen, rejected) in enumerate(data.train_examples):
        for row, completion in ((pair, chosen), (pair + 2, rejected)):  # chosen rows first, then rejected
            ids, labels, mask = (batch[key][row] for key in ("input_ids", "labels", "attention_mask"))
            length = len(prompt) + len(completion)
            assert ids[:len(prompt)].tolist() == prompt.tolist()  # the same prompt tokens on both rows
            assert labels[:len(prompt)].eq(-100).all() and labels[len(prompt):length].tolist() == completion.tolist()
            assert labels[length:].eq(-100).all() and mask.sum() == length
    text = tokenizer.decode(data.train_examples[1][1].tolist(), skip_special_tokens=False)
    assert text.startswith("Hello!") and "<|eos|>" in text and "Hi" not in text  # the answer and its end-of-turn


def test_overlong_pairs_keep_their_prompt_and_too_long_prompts_are_dropped_with_a_count(tmp_path, tokenizer):
    records = [{"prompt": "hi", "chosen": "word " * 60, "rejected": "no"},
               {"prompt": "word " * 60, "chosen": "yes", "rejected": "no"},
               {"prompt": "hi", "chosen": "yes", "rejected": "no"}]
    data = data_module(tokenizer, write_jsonl(records, tmp_path / "long.jsonl"), val_fraction=0.0, seq_len=40)
    with pytest.warns(UserWarning, match="2 of 3 pairs are longer than seq_len \\+ 1 = 41 tokens: 1 with their "
                                         "completions cut at the end, 1 dropped"):
        data.load_examples()
    (prompt, chosen, rejected), short = data.train_examples
    assert len(prompt) + len(chosen) == 41 and len(rejected) < len(chosen)
    whole = data_module(tokenizer, seq_len=1000).encode(read_pairs(tmp_path / "long.jsonl"))[0][0]
    assert prompt.tolist() == whole[0].tolist() and chosen.tolist() == whole[1][:len(chosen)].tolist()


def test_a_pair_the_cut_makes_the_same_is_dropped(tmp_path, tokenizer):
    """Completions that differ only after seq_len + 1 tokens would be a pair that prefers nothing (loss log 2, no
    gradient, a tie in rewards/accuracies): dropped and counted."""
    records = [{"prompt": "hi", "chosen": "word " * 60 + "yes", "rejected": "word " * 60 + "no"},
               {"prompt": "hi", "chosen": "word " * 60 + "yes", "rejected": "no"}]
    data = data_module(tokenizer, write_jsonl(records, tmp_path / "same.jsonl"), val_fraction=0.0, seq_len=40)
    with pytest.warns(UserWarning, match="2 of 2 pairs .* 1 with their completions cut at the end, 1 dropped"):
        data.load_examples()
    (_, chosen, rejected), = data.train_examples
    assert tokenizer.decode(rejected.tolist()).startswith("no")


def test_pair_batches_resume_exactly_and_carry_the_reference():
    examples = [(np.arange(3) + i, np.arange(i % 4 + 1), np.arange(2)) for i in range(20)]
    reference = torch.randn(2, 20)
    loader = PairBatches(examples, 4, 0, shuffle=True, seed=1)
    loader.reference = reference
    first = [batch for _, batch in zip(range(8), loader)]
    resumed = PairBatches(examples, 4, 0, shuffle=True, seed=1, progress=Progress(batches=6))
    resumed.reference = reference
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first[6:], resumed))
    for batch in first:
        assert torch.equal(batch["reference_logps"], reference[:, batch["pair_index"]])
    epoch = torch.cat([batch["pair_index"] for batch in first[:5]])
    assert sorted(epoch.tolist()) == list(range(20))  # every pair once an epoch


# ====================================================================== the reference is frozen
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
@pytest.mark.parametrize("lora", [False, True])
def test_the_reference_never_changes_and_lora_keeps_no_copy(tmp_path, tokenizer, name, lora):
    """After training steps (reference: model), the reference log-probabilities equal those of step 0 bit for bit;
    under LoRA they come from the same weights (no second copy: the tensors alive weigh the model's once), without
    LoRA from a frozen copy (twice)."""
    targets = ["q", "v"] + (["experts"] if name == "Mixtral" else [])
    config = dict(vocab_size=tokenizer.vocab_size, max_position_embeddings=128, learning_rate=1e-2, warmup_steps=0,
                  preference=PreferenceSettings(reference="model"), lora={"r": 8, "targets": targets} if lora else None)
    model = tiny_model(name, **config)
    data = data_module(tokenizer, write_jsonl(make_pairs(24), tmp_path / "pairs.jsonl"), val_fraction=0.0)
    data.load_examples()
    probe = PairBatches(data.train_examples, 8, data.pad_token_id, shuffle=False).collate(np.arange(8))
    before = model.reference_logps(probe)
    weights = sum(p.nbytes for p in model.parameters())
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    models_before = live_models()
    trainer.fit(model, data)
    assert live_models() - models_before == (0 if lora else 1)  # in the whole process: the copy, or no other model
    assert torch.equal(model.reference_logps(probe), before)
    logps = model.completion_logps(probe)[0].detach().view(2, -1)
    assert not torch.equal(logps, before)  # the model did move
    held = live_tensor_bytes(model)
    copy = model.__dict__.get("reference_model")
    assert (copy is None) == lora
    assert held < 1.5 * weights if lora else held > 1.9 * weights, (held, weights)


def live_models() -> int:
    import gc

    from llmzoo.models import CausalLM

    gc.collect()
    return sum(issubclass(type(obj), CausalLM) for obj in gc.get_objects())  # not weak proxies


def live_tensor_bytes(model) -> int:
    """Bytes of the distinct storages of the parameters and buffers reachable from ``model`` (its frozen copy too)."""
    modules = [model, model.__dict__.get("reference_model") or model]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(storages.values())


# ====================================================================== the command line
@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("dpo")
    model = Llama(vocab_size=tokenizer.vocab_size, embed_dim=32, num_heads=4, num_kv_heads=2, num_layers=2,
                  max_position_embeddings=128)
    save_checkpoint({**lightning_checkpoint(model), "tokenizer": tokenizer.state_dict()}, tmp / "base.ckpt")
    return SimpleNamespace(dir=tmp, ckpt=tmp / "base.ckpt", pairs=write_jsonl(make_pairs(48), tmp / "pairs.jsonl"))


FAST = ["--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar",
        "false", "--data.batch_size", "4", "--data.val_fraction", "0.2", "--checkpoint.every_n_train_steps", "2"]


def test_fit_dpo_from_a_pretrained_checkpoint_resumes_exactly_with_its_reference(capsys, caplog, base, tmp_path):
    """4 steps straight, and 2 steps then a resume to 4: the same weights, bit for bit; the precomputed reference
    is in the checkpoint and is not recomputed on resume; the metrics are logged."""
    common = ["--config", CONFIGS / "dpo.yaml", "--model.pretrained", base.ckpt, "--data.path", base.pairs, *FAST]
    straight, split = tmp_path / "straight", tmp_path / "split"
    result = llmzoo(capsys, "fit", *common, "--trainer.max_steps", "4", "--trainer.default_root_dir", straight,
                    "--trainer.log_every_n_steps", "1")
    assert result.code == 0, result.err[-3000:]
    caplog.set_level("INFO")
    caplog.clear()
    assert llmzoo(capsys, "fit", *common, "--trainer.max_steps", "2", "--trainer.default_root_dir", split).code == 0
    assert "reference log-probabilities of the 39 train pairs precomputed" in caplog.text
    first = torch.load(split / "checkpoints" / "last.ckpt", weights_only=True)
    caplog.clear()
    result = llmzoo(capsys, "fit", *common, "--trainer.max_steps", "4", "--trainer.default_root_dir", split,
                    "--ckpt_path", "last")
    assert result.code == 0, result.err[-3000:]
    assert "Restored all states" in caplog.text and "precomputed" not in caplog.text  # read from the checkpoint
    a, b = (torch.load(root / "checkpoints" / "last.ckpt", weights_only=True) for root in (straight, split))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert not torch.equal(a["state_dict"]["embed.weight"], first["state_dict"]["embed.weight"])
    stored = a["PreferenceDataModule"]["reference_logps"]
    assert stored["train"].shape == (2, 39) and stored["val"].shape == (2, 9)
    assert torch.equal(stored["train"], first["PreferenceDataModule"]["reference_logps"]["train"])
    assert a["hyper_parameters"]["preference"] == {"loss_type": "dpo", "beta": 0.1, "label_smoothing": 0.0,
                                                   "gamma": 0.5, "reference": "precomputed"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((straight / "lightning_logs").glob("version_*")))).Reload()
    for stage in ("train", "val"):
        for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                     "logps/rejected"):
            assert f"{stage}/{name}" in events.Tags()["scalars"], (stage, name)


def test_fit_dpo_lora_and_simpo_run_and_print_every_setting(capsys, base, tmp_path):
    result = llmzoo(capsys, "fit", "--config", CONFIGS / "dpo-lora.yaml", "--model.pretrained", base.ckpt,
                    "--data.path", base.pairs, "--print_config")
    assert result.code == 0, result.err[-3000:]
    import yaml

    config = yaml.safe_load(result.out)
    assert config["model"]["init_args"]["preference"] == {"loss_type": "dpo", "beta": 0.1, "label_smoothing": 0.0,
                                                          "gamma": 0.5, "reference": "model"}
    assert config["data"]["class_path"] == "llmzoo.data.PreferenceDataModule"
    for config_file, extra in (("dpo-lora.yaml", []), ("dpo.yaml", ["--model.preference.loss_type", "simpo"])):
        root = tmp_path / config_file
        result = llmzoo(capsys, "fit", "--config", CONFIGS / config_file, "--model.pretrained", base.ckpt,
                        "--data.path", base.pairs, "--trainer.max_steps", "2", "--trainer.default_root_dir", root,
                        "--trainer.logger", "false", *FAST, *extra)
        assert result.code == 0, result.err[-3000:]
        assert (root / "checkpoints" / "last.ckpt").is_file()


BAD_RECORDS = {
    "missing": ['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": "b"}'],
    "same": ['{"prompt": "a", "chosen": "b", "rejected": "b"}'],
    "empty": ['{"prompt": "a", "chosen": "b", "rejected": "c"}', '{"prompt": "a", "chosen": " ", "rejected": "c"}'],
}


@pytest.mark.parametrize("args, message", [
    (["--data.path", "{missing}"], "line 2: a preference record needs the keys ['prompt', 'chosen', 'rejected'], got "
                                   "['chosen', 'prompt']"),
    (["--data.path", "{same}"], "line 1: chosen and rejected are the same"),
    (["--data.path", "{empty}"], "line 2: the chosen completion is empty"),
    (["--model.preference.beta", "0"], "--model.preference.beta=0.0 must be positive"),
    (["--model.preference.beta", "-0.1"], "--model.preference.beta=-0.1 must be positive"),
    (["--model.preference.loss_type", "kto"], "--model.preference.loss_type='kto' is not a preference loss"),
    (["--model.preference", "null"], "PreferenceDataModule trains with a preference objective"),
    (["--data", "TextDataModule", "--data.path", "{text}", "--data.tokenizer", "char"],
     "preference settings (--model.preference) need preference data: --data PreferenceDataModule"),
])
def test_bad_preference_input_is_one_line_and_writes_nothing(capsys, base, tmp_path, args, message):
    paths = {f"{{{name}}}": (tmp_path / f"{name}.jsonl") for name in BAD_RECORDS}
    for name, lines in BAD_RECORDS.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    paths["{text}"] = tmp_path / "text.txt"
    paths["{text}"].write_text("plain text, not preference pairs\n" * 50)
    root = tmp_path / "run"
    result = llmzoo(capsys, "fit", "--config", CONFIGS / "dpo.yaml", "--model.pretrained", base.ckpt, "--data.path",
                    base.pairs, "--trainer.default_root_dir", root, "--trainer.max_steps", "2", *FAST,
                    *[str(paths.get(arg, arg)) for arg in args])
    assert result.code == 1 and message in result.err, result.err[-2000:]
    assert result.err.strip().splitlines()[-1].startswith("llmzoo: error")
    assert not root.exists()


# ====================================================================== the reference outside fit
def quiet_trainer(root, **kwargs) -> L.Trainer:
    return L.Trainer(default_root_dir=root, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     **kwargs)


def test_validate_has_the_reference_of_the_run_outside_fit(tmp_path, tokenizer, base):
    """validate / test do not start with on_fit_start: before training the model is its own reference (rewards 0,
    loss log 2); a checkpoint of a frozen-copy run is validated against the copy (its fit's figures), and without
    the starting weights to copy it is refused rather than compared with itself."""
    def pairs():
        return data_module(tokenizer, base.pairs, val_fraction=0.2)

    start = quiet_trainer(tmp_path).validate(load_pretrained(base.ckpt, preference=PreferenceSettings()), pairs())[0]
    assert start["val/rewards/margins"] == 0 and start["val/loss"] == pytest.approx(np.log(2))
    settings = dict(learning_rate=1e-2, warmup_steps=0, preference=PreferenceSettings(reference="model"))
    fit = quiet_trainer(tmp_path, max_steps=2, val_check_interval=2, limit_val_batches=1)
    fit.fit(load_pretrained(base.ckpt, **settings), pairs())
    fit.save_checkpoint(tmp_path / "dpo.ckpt")
    validated = quiet_trainer(tmp_path, limit_val_batches=1).validate(load_pretrained(base.ckpt, **settings), pairs(),
                                                                      ckpt_path=tmp_path / "dpo.ckpt")[0]
    assert validated["val/loss"] == pytest.approx(fit.callback_metrics["val/loss"].item(), abs=1e-6)
    assert abs(validated["val/rewards/margins"]) > 1e-4  # not the policy against itself
    model = Llama(vocab_size=tokenizer.vocab_size, embed_dim=32, num_heads=4, num_kv_heads=2, num_layers=2,
                  max_position_embeddings=128, **settings)  # no pretrained: no starting weights to copy
    with pytest.raises(ValueError, match="needs the starting weights, which a restored checkpoint's are not"):
        quiet_trainer(tmp_path, limit_val_batches=1).validate(model, pairs(), ckpt_path=tmp_path / "dpo.ckpt")


def test_the_precomputed_reference_is_made_in_the_steps_precision(tmp_path, tokenizer, base):
    """bf16-mixed: the reference pass runs under the autocast of the policy's steps (made outside it, the step-0
    rewards are float32 against bfloat16 and the accuracies not 0)."""
    data = data_module(tokenizer, base.pairs)
    quiet_trainer(tmp_path, max_steps=1, precision="bf16-mixed", limit_val_batches=0, enable_checkpointing=False).fit(
        load_pretrained(base.ckpt, preference=PreferenceSettings()), data)
    start = load_pretrained(base.ckpt, preference=PreferenceSettings())
    batches = PairBatches(data.train_examples, 4, data.pad_token_id, shuffle=False)

    def reference():
        return torch.cat([start.reference_logps(batches.collate(batches.indices(n))) for n in range(len(batches))], 1)

    with torch.autocast("cpu", torch.bfloat16):
        in_autocast = reference()
    assert torch.equal(data.reference["train"], in_autocast) and not torch.equal(data.reference["train"], reference())


# ====================================================================== the demonstration (slow)
def held_out_accuracy(ckpt_path: Path, pairs: Path, held_out: Path) -> float:
    """The share of held-out pairs whose chosen reward beats the rejected one, from a DPO run's last checkpoint (its
    precomputed reference of the held-out pairs) and its model."""
    from llmzoo.models import CausalLM

    checkpoint = torch.load(ckpt_path, weights_only=True)
    model = CausalLM.load_from_checkpoint(ckpt_path).eval()
    data = PreferenceDataModule(path=str(pairs), val_path=str(held_out), tokenizer=str(ckpt_path), template="alpaca",
                                seq_len=128, batch_size=50)
    data.load_state_dict(checkpoint["PreferenceDataModule"])  # the reference, checked against these pairs
    wins = []
    with torch.no_grad():
        for batch in data.val_dataloader():
            logps, tokens, _ = model.completion_logps(batch)
            _, chosen, rejected = preference_loss(logps.view(2, -1), batch["reference_logps"], tokens.view(2, -1),
                                                  model.preference_settings)
            wins.append(chosen > rejected)
    return torch.cat(wins).float().mean().item()


@pytest.mark.slow
def test_dpo_teaches_an_sft_model_to_prefer_a_checkable_property(tmp_path, shakespeare):
    """A Llama pretrained on Tiny Shakespeare, SFT'd on the instruction set, then DPO (configs/dpo.yaml) on pairs
    whose chosen answer is right and ends with "!" (the rejected one a wrong word): held-out reward accuracy and the
    share of greedy answers to held-out prompts ending with "!", before and after. The figures of docs/finetuning.md come from this test (it prints them)."""
    from test_finetune_demo import BASE, QUIET, greedy_replies, llmzoo as run

    started = time.perf_counter()
    torch.set_num_threads(2)
    base, sft, dpo = (tmp_path / name / "checkpoints" / "last.ckpt" for name in ("base", "sft", "dpo"))
    run("fit", *BASE, "--trainer.max_steps", "200", "--data.path", shakespeare, "--trainer.default_root_dir",
        tmp_path / "base", *QUIET)
    train, test = write_instructions(tmp_path / "instructions")  # test.jsonl: 200 held-out prompts to answer
    run("fit", "--config", CONFIGS / "sft.yaml", "--model.pretrained", base, "--data.path", train,
        "--trainer.max_steps", "300", "--trainer.val_check_interval", "300", "--trainer.default_root_dir",
        tmp_path / "sft", *QUIET)
    pairs = write_jsonl(make_pairs(2000, seed=0), tmp_path / "pairs.jsonl")
    held_out = write_jsonl(make_pairs(200, seed=1), tmp_path / "held_out.jsonl")
    before = [reply.endswith(MARK) for reply in greedy_replies(sft, test)]
    run("fit", "--config", CONFIGS / "dpo.yaml", "--model.pretrained", sft, "--data.path", pairs, "--data.val_path",
        held_out, "--trainer.default_root_dir", tmp_path / "dpo", *QUIET)
    replies = greedy_replies(dpo, test)
    after = [reply.endswith(MARK) for reply in replies]
    accuracy = held_out_accuracy(dpo, pairs, held_out)
    print(f"\nDPO on {len(read_jsonl(pairs))} pairs, {len(after)} held-out: rewards/accuracies {accuracy:.3f}; greedy "
          f"answers ending with {MARK!r}: before {np.mean(before):.1%}, after {np.mean(after):.1%} (e.g. "
          f"{replies[:3]}); {time.perf_counter() - started:.0f} s in all")
    assert accuracy >= 0.9
    assert np.mean(after) >= np.mean(before) + 0.5
