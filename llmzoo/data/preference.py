"""Preference data: ``{"prompt", "chosen", "rejected"}`` records for DPO, IPO and SimPO (see docs/finetuning.md)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from llmzoo.data.chat import check_messages, numbered_records
from llmzoo.data.sft import IGNORE_INDEX, ExampleBatches, SFTDataModule, encode_chats, pad_rows

KEYS = ("prompt", "chosen", "rejected")


def as_messages(value: object, role: str, where: str) -> list[dict]:
    """A record's field as messages: a string is one message of ``role``, a list of ``{"role", "content"}`` is
    itself (checked)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise ValueError(f"{where} must be a string or a list of {{\"role\", \"content\"}} messages")
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in value]
    check_messages(messages, where)
    return messages


def read_pairs(path) -> list[tuple[str, list[dict], list[dict], list[dict]]]:
    """``(where, prompt, chosen, rejected)`` of each record of a ``.jsonl`` / ``.json`` file, as messages: the prompt
    a string (a user message, after an optional ``"system"``) or messages; each completion a string or assistant
    messages. A malformed record is a one-line ``ValueError`` naming its line: a missing key, an empty completion,
    ``chosen == rejected``."""
    pairs = []
    for where, record in numbered_records(path):
        if not isinstance(record, dict) or not all(key in record for key in KEYS):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: a preference record needs the keys {list(KEYS)}, got {got}: give the prompt "
                             f"and both completions of the pair")
        prompt = as_messages(record["prompt"], "user", f"{where}: \"prompt\"")
        if record.get("system") and isinstance(record["prompt"], str):
            prompt = [{"role": "system", "content": record["system"]}, *prompt]
        chosen, rejected = (as_messages(record[key], "assistant", f"{where}: \"{key}\"") for key in KEYS[1:])
        for key, completion in (("chosen", chosen), ("rejected", rejected)):
            if any(message["role"] != "assistant" for message in completion):
                raise ValueError(f"{where}: \"{key}\" holds a message that is not the assistant's: a completion is "
                                 f"assistant messages only (put the conversation before it in \"prompt\")")
            if not "".join(message["content"] for message in completion).strip():
                raise ValueError(f"{where}: the {key} completion is empty: give it text or drop the record")
        if chosen == rejected:
            raise ValueError(f"{where}: chosen and rejected are the same, so the pair prefers nothing: make them "
                             f"differ or drop the record")
        pairs.append((where, prompt, chosen, rejected))
    return pairs


class PairBatches(ExampleBatches):
    """Batches of ``B`` pairs ``(prompt ids, chosen ids, rejected ids)`` as one batch of ``2B`` rows, the chosen
    completions then the rejected ones, each after its prompt: ``input_ids``, ``labels`` (-100 on the prompt and the
    padding), ``attention_mask`` ``[2B, L]``, ``pair_index [B]`` (the pairs' numbers) and, once known,
    ``reference_logps [2, B]`` (the reference's summed completion log-probabilities, chosen then rejected). Order,
    ranks and resuming as :class:`ExampleBatches`."""

    reference: torch.Tensor | None = None  # [2, pairs]

    def collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        pairs = [self.examples[i] for i in indices]
        rows = [(np.concatenate([prompt, completions[side]]),
                 np.concatenate([np.full(len(prompt), IGNORE_INDEX), completions[side]]))
                for side in (0, 1) for prompt, *completions in pairs]
        batch = pad_rows(rows, self.pad_token_id)
        batch["pair_index"] = torch.as_tensor(indices, dtype=torch.int64)
        if self.reference is not None:
            batch["reference_logps"] = self.reference[:, indices]
        return batch


class PreferenceDataModule(SFTDataModule):
    """Preference pairs for DPO, IPO and SimPO: ``.jsonl`` / ``.json`` records ``{"prompt", "chosen", "rejected"}``,
    each a string (the prompt a user message, after an optional ``"system"``; a completion the assistant's answer)
    or a list of ``{"role", "content"}`` messages (the prompt a conversation, each completion assistant messages).

    The prompt is rendered with the chat ``template`` and its generation prompt and tokenized once; each completion is
    what the template writes after it (the answer and its end-of-turn marker), tokenized on its own, and the pair's
    two rows share the prompt's tokens. Labels are -100 on the prompt and the padding: only completion tokens count.

    Too long: the prompt is kept whole and each completion cut at its end so that prompt + completion has at most
    ``seq_len + 1`` tokens; a pair whose prompt alone leaves no room for a completion token, or whose two cut
    completions are the same, is dropped; a warning counts both. ``val_path`` is the validation data; without it,
    a seeded ``val_fraction`` of the pairs. Training batches (:class:`PairBatches`) are seeded permutations and
    resume exactly; the reference log-probabilities of every pair, when the model precomputes them
    (:meth:`precompute_reference`), are kept here and saved in the checkpoints with a digest of the pairs they
    belong to.

    Args:
        path: the preference data: files, folders or globs of .jsonl / .json files.
        val_path: validation data in the same format (default: val_fraction of path's pairs).
        val_fraction: the share of the pairs held out for validation when there is no val_path.
        seq_len: the longest input of the model; a prompt and a completion have at most seq_len + 1 tokens together.
        batch_size: pairs per batch (the model reads twice as many rows).
        num_workers: DataLoader workers.
        tokenizer: the pretrained model's checkpoint, Hugging Face directory or tokenizer.json (default: the CLI
            passes --model.pretrained).
        template: the chat template: chatml, llama3, alpaca or a .jinja file; default: the tokenizer source's own,
            else chatml.
        seed: seed of the split and of the order of the training pairs.
    """

    batch_class = PairBatches
    unit = "pair"

    def __init__(self, path: str | list[str] | None = None, val_path: str | list[str] | None = None,
                 val_fraction: float = 0.05, seq_len: int = 512, batch_size: int = 8, num_workers: int = 0,
                 tokenizer: str | None = None, template: str | None = None, seed: int = 0):
        super().__init__(path, val_path, val_fraction, seq_len, batch_size, num_workers, tokenizer, template, seed=seed)
        self.reference: dict[str, torch.Tensor] = {}  # split -> [2, pairs]

    # ----------------------------------------------------------------- pairs
    def encode(self, pairs: list) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], int, int]:
        """``(examples, truncated, dropped)``: each pair as ``(prompt ids, chosen ids, rejected ids)``."""
        template, prompts, completions = self.chat_template, [], []
        for where, prompt, *answers in pairs:
            prompts.append(template.render(prompt, add_generation_prompt=True))
            for answer in answers:
                text = template.render(prompt + answer)
                if not text.startswith(prompts[-1]):
                    raise ValueError(f"{where}: chat template {template.name} does not render the prompt with its "
                                     f"generation prompt as the beginning of prompt + completion, so the completion "
                                     f"cannot be told apart: use another template")
                completions.append(text[len(prompts[-1]):])
        ids = [np.asarray(encoding.ids, dtype=np.int64) for encoding in encode_chats(self.tokenizer, prompts + completions)]
        limit, truncated, dropped, examples = self.hparams.seq_len + 1, 0, 0, []
        for prompt, chosen, rejected in zip(ids, ids[len(prompts)::2], ids[len(prompts) + 1::2]):
            room = limit - len(prompt)
            if room < 1 or (max(len(chosen), len(rejected)) > room and np.array_equal(chosen[:room], rejected[:room])):
                dropped += 1  # no room for a completion token, or the cut leaves nothing to prefer
                continue
            truncated += max(len(chosen), len(rejected)) > room
            examples.append((prompt, chosen[:room], rejected[:room]))
        return examples, truncated, dropped

    def read_file(self, file) -> list:
        return read_pairs(file)

    def overlong_note(self, truncated: int, dropped: int) -> str:
        return (f"{truncated} with their completions cut at the end, {dropped} dropped (their prompt alone is that "
                f"long, or the cut made both completions the same; prompts are never cut): a longer --data.seq_len "
                f"keeps them whole")

    def check_model(self, model) -> None:
        """The SFT checks (the data is read: a malformed record stops the run before anything is written), and the
        model must have preference settings."""
        super().check_model(model)
        if getattr(model, "hparams", {}).get("preference") is None:
            raise ValueError("PreferenceDataModule trains with a preference objective, which the model lacks: give it "
                             "--model.preference.loss_type dpo (or ipo, simpo), or use --config configs/dpo.yaml")

    def batches(self, examples: list, train: bool) -> PairBatches:
        batches = super().batches(examples, train)
        batches.reference = self.reference.get("train" if train else "val")
        return batches

    # ----------------------------------------------------------------- the reference
    def splits(self) -> dict[str, list]:
        self.load_examples()
        return {"train": self.train_examples, "val": self.val_examples}

    def precompute_reference(self, logps: Callable[[dict], torch.Tensor]) -> None:
        """Keep ``logps(batch) -> [2, B]`` (the reference's summed completion log-probabilities) of every training and
        validation pair: one pass, in order, for each split that has none yet (a resumed run has them)."""
        for split, examples in self.splits().items():
            if split in self.reference or not examples:
                continue
            batches = PairBatches(examples, self.hparams.batch_size, self.pad_token_id, shuffle=False)
            values = [logps(batches.collate(batches.indices(number))) for number in range(len(batches))]
            self.reference[split] = torch.cat(values, dim=1).float().cpu()
            rank_zero_info(f"PreferenceDataModule: reference log-probabilities of the {len(examples)} {split} pairs "
                           f"precomputed")

    def digests(self) -> dict[str, str]:
        """A digest of the tokens of each split's pairs: which pairs stored reference values belong to."""
        digests = {}
        for split, examples in self.splits().items():
            digest = hashlib.sha256()
            for example in examples:
                for ids in example:
                    digest.update(len(ids).to_bytes(4, "little") + ids.tobytes())
            digests[split] = digest.hexdigest()
        return digests

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """The SFT state (tokenizer, chat template) and the precomputed reference log-probabilities, with digests."""
        digests = self.digests()
        return {**super().state_dict(), "reference_logps": dict(self.reference),
                "reference_digests": {split: digests[split] for split in self.reference}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        stored, digests = state.get("reference_logps") or {}, self.digests()
        changed = [split for split in stored if state["reference_digests"][split] != digests[split]]
        if changed:
            raise ValueError(f"the checkpoint's reference log-probabilities are of other {' and '.join(changed)} pairs "
                             f"than this data's (did --data.path, --data.seq_len or the template change?): resume with "
                             f"the data of the run")
        self.reference = dict(stored)
