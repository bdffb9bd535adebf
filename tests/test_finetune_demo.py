"""Fine-tuning works, end to end through `llmzoo fit` on a CPU: a small Llama pretrained here on Tiny Shakespeare,
then supervised fine-tuning (all weights, configs/sft.yaml) and LoRA (configs/sft-lora.yaml) on the instruction
set llmzoo generates (llmzoo.data.instructions), with exact-match accuracy on held-out records before and after.
The figures of docs/finetuning.md come from this test (it prints them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmzoo.cli.chat import end_of_turn_ids, load_chat_model, run_template
from llmzoo.data import read_records
from llmzoo.data.instructions import write_instructions
from llmzoo.data.sft import encode_chats
from llmzoo.generation import GenerationConfig, generate, left_pad

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--model", "Llama", "--model.embed_dim", "128", "--model.num_heads", "4", "--model.num_kv_heads", "2",
        "--model.num_layers", "4", "--model.max_position_embeddings", "128", "--model.learning_rate", "2e-3",
        "--model.warmup_steps", "30", "--data", "TextDataModule", "--data.seq_len", "128", "--data.batch_size", "16",
        "--data.bpe_vocab_size", "2048", "--trainer.max_steps", "300", "--trainer.limit_val_batches", "0"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]


def llmzoo(*args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "llmzoo", *map(str, args)], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=3600)
    assert result.returncode == 0, f"{result.args}\n{result.stderr[-4000:]}"


def exact_match(ckpt_path: Path, records_path: Path, template: str | None = None) -> float:
    """Greedy answers of a checkpoint to the prompts of a prompt/response file, rendered with the run's chat template
    (or ``template``), compared with the responses: the share that are equal."""
    replies = greedy_replies(ckpt_path, records_path, template)
    return sum(reply == messages[-1]["content"] for reply, messages in zip(replies, read_records(records_path))) / len(replies)


def greedy_replies(ckpt_path: Path, records_path: Path, template: str | None = None) -> list[str]:
    """Greedy answers of a checkpoint to the prompts of a prompt/response file, rendered with the run's chat template
    (or ``template``), without the end-of-turn marker and padding."""
    model, tokenizer, checkpoint = load_chat_model(str(ckpt_path))
    chat_template = run_template(str(ckpt_path), tokenizer, checkpoint, template)
    conversations = read_records(records_path)
    prompts = [chat_template.render(messages[:-1], add_generation_prompt=True) for messages in conversations]
    rows = [encoding.ids for encoding in encode_chats(tokenizer, prompts)]
    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=end_of_turn_ids(chat_template, tokenizer),
                              pad_token_id=tokenizer.pad_token_id, stop_strings=[chat_template.end_of_turn])
    replies = []
    for start in range(0, len(rows), 50):
        input_ids, mask = left_pad(rows[start:start + 50], tokenizer.pad_token_id)
        with torch.no_grad():
            output = generate(model, input_ids, config, attention_mask=mask, decode=tokenizer.decode)
        for ids in output[:, input_ids.shape[1]:].tolist():
            reply = tokenizer.decode(ids, skip_special_tokens=False).split(chat_template.end_of_turn)[0]
            replies.append(reply.replace("<|pad|>", "").strip())
    return replies


@pytest.mark.slow
def test_sft_and_lora_teach_a_pretrained_model_an_instruction_task(tmp_path, shakespeare):
    torch.set_num_threads(2)
    llmzoo("fit", *BASE, "--data.path", shakespeare, "--trainer.default_root_dir", tmp_path / "base", *QUIET)
    base = tmp_path / "base" / "checkpoints" / "last.ckpt"
    train, test = write_instructions(tmp_path / "instructions")
    before = exact_match(base, test, template="alpaca")
    accuracy = {}
    for name in ("sft", "sft-lora"):
        llmzoo("fit", "--config", ROOT / "configs" / f"{name}.yaml", "--model.pretrained", base, "--data.path", train,
               "--trainer.default_root_dir", tmp_path / name, *QUIET)
        accuracy[name] = exact_match(tmp_path / name / "checkpoints" / "last.ckpt", test)
    print(f"\nexact match on {len(read_records(test))} held-out records: before {before:.1%}, full fine-tuning "
          f"{accuracy['sft']:.1%}, LoRA {accuracy['sft-lora']:.1%}")
    assert before <= 0.05
    assert accuracy["sft"] >= 0.9 and accuracy["sft-lora"] >= 0.9, accuracy
