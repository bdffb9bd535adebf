"""lm-evaluation-harness on llmzoo models: :class:`LLMZooLM`, the harness's model interface implemented natively
(no export to transformers), and :func:`run_tasks`. Needs the ``eval`` extra: ``pip install "llmzoo[eval]"``.

- ``loglikelihood``: requests sorted by length, right-padded into batches; one forward pass per batch (the
  output head runs only on the continuation's positions), its log-softmax in float32;
- ``loglikelihood_rolling``: the harness's own disjoint windows of the model's context, scored the same way;
- ``generate_until``: left-padded batches through :func:`llmzoo.generation.generate` with the request's stop
  strings (and the end-of-sequence token); the text is cut before the first stop string, as the harness does.

Tokenization follows lm-eval's Hugging Face model (``HFLM``): the tokenizer's post-processor applies (a Llama
tokenizer adds its ``<s>``), the pair ``context + continuation`` is encoded whole and split after the context's
tokens, an empty context becomes the document-start token (:func:`llmzoo.evaluation.document_start_token`).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm.auto import tqdm

from llmzoo.data.tokenizer import Tokenizer
from llmzoo.evaluation import document_start_token
from llmzoo.generation import GenerationConfig, generate, left_pad

SAMPLING_OPTIONS = ("top_k", "top_p", "min_p", "repetition_penalty", "num_beams", "seed")  # passed on as they are


class LLMZooLM(TemplateLM):
    """An llmzoo model and its tokenizer as an lm-eval ``LM``. ``batch_size``: requests per forward pass (or per
    generation call); ``max_length``: the context used (default: the model's); ``max_gen_toks``: new tokens of a
    ``generate_until`` request that sets none."""

    def __init__(self, model, tokenizer: Tokenizer, batch_size: int = 16, max_length: int | None = None,
                 max_gen_toks: int = 256):
        super().__init__()
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self._max_length, self.max_gen_toks = max_length, max_gen_toks
        self._device = model.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return document_start_token(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.hparams.max_position_embeddings

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string``; the tokenizer's post-processor applies unless ``add_special_tokens=False``."""
        return self.tokenizer.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # ------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), whether greedy decoding gives it)`` of each ``(key, context ids,
        continuation ids)``; a pair longer than the context loses its first tokens, as in the harness."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm or None, leave=False)
        for first in range(0, len(order), self.batch_size):
            chunk = order[first:first + self.batch_size]
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chunk]
            for i, answer in zip(chunk, self._score_batch(rows, [requests[i][2] for i in chunk])):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(chunk))
        bar.close()
        return results

    def _score_batch(self, rows: list[list[int]], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """One forward pass over the right-padded ``rows`` (causal attention: padding after a row changes nothing
        before it); the head and log-softmax on the last ``len(continuation)`` positions of each row only."""
        input_ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        for row, ids in enumerate(rows):
            input_ids[row, :len(ids)] = torch.tensor(ids)
        hidden, _ = self.model.backbone(input_ids.to(self.device))
        picked = [hidden[row, len(ids) - len(cont):len(ids)] for row, (ids, cont) in enumerate(zip(rows, continuations))]
        logprobs = F.log_softmax(self.model.lm_head(torch.cat(picked)).float(), dim=-1)  # [continuation tokens, V]
        targets = torch.tensor([t for cont in continuations for t in cont], device=self.device)
        scores = logprobs.gather(1, targets[:, None])[:, 0]
        greedy = logprobs.argmax(-1) == targets
        answers, at = [], 0
        for cont in continuations:
            answers.append((float(scores[at:at + len(cont)].sum()), bool(greedy[at:at + len(cont)].all())))
            at += len(cont)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text: the harness's disjoint windows of ``max_length`` tokens (the first
        after the document-start token), each scored given the tokens before it in its window."""
        windows, owners = [], []
        for number, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(number)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until one of its ``until`` strings (cut off), the end-of-sequence token or
        ``max_gen_toks`` new tokens; requests with the same generation options share batches."""
        groups: dict[str, list[int]] = {}
        for number, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(number)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or None, leave=False)
        for numbers in groups.values():
            config, until = self._generation_config(dict(requests[numbers[0]].args[1]))
            prompts = {n: self.tok_encode(requests[n].args[0])[-(self.max_length - config.max_new_tokens):]
                       or [self.prefix_token_id] for n in numbers}
            order = sorted(numbers, key=lambda n: -len(prompts[n]))
            for first in range(0, len(order), self.batch_size):
                chunk = order[first:first + self.batch_size]
                input_ids, mask = left_pad([prompts[n] for n in chunk], config.fill_token_id, self.device)
                output = generate(self.model, input_ids, config, attention_mask=mask, decode=self.tok_decode)
                for n, ids in zip(chunk, output[:, input_ids.shape[1]:].tolist()):
                    results[n] = postprocess_generated_text(self.tok_decode(ids), until, None)
                    self.cache_hook.add_partial("generate_until", requests[n].args, results[n])
                bar.update(len(chunk))
        bar.close()
        return results

    def _generation_config(self, gen_kwargs: dict) -> tuple[GenerationConfig, list[str]]:
        """llmzoo's :class:`~llmzoo.generation.GenerationConfig` of a request's options, and its stop strings."""
        options = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(options.pop("until", None), eos=None)  # the eos token stops rows itself
        requested = options.pop("max_gen_toks")
        max_new_tokens = min(requested, self.max_length - 1)
        if max_new_tokens < requested:
            print(f"llmzoo: note: generating at most {max_new_tokens} of the {requested} tokens asked, what the "
                  f"model's context of {self.max_length} leaves", file=sys.stderr)
        temperature, do_sample = options.pop("temperature", 0.0), options.pop("do_sample", False)
        unknown = sorted(set(options) - set(SAMPLING_OPTIONS))
        if unknown:
            raise ValueError(f"generation options {unknown} are not supported by llmzoo: use {list(SAMPLING_OPTIONS)}, "
                             f"do_sample, temperature, until and max_gen_toks")
        sampling = bool(do_sample) and temperature > 0
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                                  temperature=temperature if sampling else 1.0, eos_token_id=self.eot_token_id,
                                  pad_token_id=self.tokenizer.pad_token_id, stop_strings=until or None, **options)
        return config, until


def run_tasks(model, tokenizer: Tokenizer, tasks: list[str], limit: float | None = None, num_fewshot: int | None = None,
              batch_size: int = 16, include_path: list[str] | None = None, seed: int = 0) -> dict:
    """lm-eval's ``simple_evaluate`` of ``tasks`` (names, or tasks of the YAML files under ``include_path``) with
    :class:`LLMZooLM`; the harness's results dict (no per-sample logs)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # tasks all under include_path need not wait for the index of the harness's 14,000 own (half a minute)
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or not all(manager.match_tasks([task]) for task in tasks):
        manager = TaskManager(include_path=include_path)
    missing = [task for task in tasks if not manager.match_tasks([task])]
    if missing:
        raise ValueError(f"unknown lm-eval task(s) {missing}: check the names (lm-eval ls tasks) or pass the folder "
                         f"of their YAML files with --include_path")
    return simple_evaluate(model=LLMZooLM(model, tokenizer, batch_size), tasks=tasks, limit=limit,
                           num_fewshot=num_fewshot, task_manager=manager, log_samples=False, random_seed=seed,
                           numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)


def table(results: dict) -> str:
    """The harness's results table (and its groups' table), as lm-eval prints them."""
    text = utils.make_table(results)
    return text + ("\n" + utils.make_table(results, "groups") if results.get("groups") else "")
