"""llmzoo's lm-evaluation-harness adapter against the harness's own Hugging Face model (HFLM) on a tiny random
Llama copied into llmzoo: the same log-likelihoods, rolling log-likelihoods and task accuracy; generate_until's
stop strings; ``llmzoo evaluate`` end to end on local task YAMLs (nothing is downloaded)."""

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from llmzoo.cli import main  # noqa: E402
from llmzoo.data import load_tokenizer_for_checkpoint  # noqa: E402
from llmzoo.harness import LLMZooLM  # noqa: E402
from llmzoo.hf import from_hf  # noqa: E402

CONTEXT = 48  # the model's context: long texts take several rolling windows, long requests are cut
TEXT = ("The quick brown fox jumps over the lazy dog. Numbers: one two three four five six seven eight nine ten. "
        "Colours: red green blue yellow. Animals: cat dog fox owl bee ant. ") * 20
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random Llama (GQA, RoPE) saved by transformers with a byte-level BPE tokenizer, GPT-2's special token."""
    directory = tmp_path_factory.mktemp("hf")
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3 if param.ndim > 1 else 0.1).add_(1.0 if param.ndim == 1 else 0.0)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def lms(hf_dir):
    hflm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=4)
    ours = LLMZooLM(from_hf(hf_dir), load_tokenizer_for_checkpoint(hf_dir), batch_size=3)
    return hflm, ours


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


def test_loglikelihood_equals_hflm(lms):
    hflm, ours = lms
    pairs = [("The quick brown", " fox"), ("Colours:", " red green"), ("", "Animals: cat"), ("one two", " three"),
             (TEXT[:400], " dog."), ("Numbers: one two three four five six", " seven eight nine ten."),
             ("fox", " jumps over the lazy dog"), ("The", " quick brown fox jumps over the lazy dog.")]
    greedy = ours.generate_until(requests("generate_until", [("Colours: red", {"until": [], "max_gen_toks": 3})]))[0]
    pairs.append(("Colours: red", greedy))  # what greedy decoding gives: is_greedy holds
    theirs, mine = hflm.loglikelihood(requests("loglikelihood", pairs)), ours.loglikelihood(requests("loglikelihood", pairs))
    assert [greedy for _, greedy in mine] == [greedy for _, greedy in theirs] and mine[-1][1]
    for (a, _), (b, _) in zip(mine, theirs):
        assert a == pytest.approx(b, abs=1e-4)
    assert max(abs(a - b) for (a, _), (b, _) in zip(mine, theirs)) < 1e-4


def test_loglikelihood_rolling_equals_hflm(lms):
    hflm, ours = lms
    texts = [("Animals: cat dog fox owl bee ant.",), (TEXT[:300],), (TEXT[:1000],)]  # 1, several, many windows
    theirs = hflm.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    mine = ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    assert len(ours.tok_encode(TEXT[:1000])) > 4 * CONTEXT
    assert mine == pytest.approx(theirs, abs=1e-4)


def test_generate_until_honours_stop_strings(lms):
    _, ours = lms
    prompt = "Numbers: one two"
    free = ours.generate_until(requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 20})]))[0]
    assert len(ours.tok_encode(free)) >= 15  # the random model does not stop by itself
    stop = free[5:8]
    cut = ours.generate_until(requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 20}),
                                                          ("Colours:", {"until": [stop], "max_gen_toks": 20})]))
    assert cut[0] == free[:free.index(stop)] and stop not in cut[1]


def write_tasks(directory, model_dir) -> None:
    """A multiple-choice task of 33 items and a perplexity task over TEXT[:1000], as local YAMLs and JSON lines."""
    items = [{"question": f"Numbers: {NUMBERS[i]} {NUMBERS[i + 1]}", "choices": [f" {NUMBERS[(i + k) % 11]}" for k in (2, 5, 7)],
              "answer": i % 3} for i in range(9)] * 3 + [{"question": "Colours: red", "choices": [" green", " dog", " seven"],
                                                          "answer": 0}] * 6
    (directory / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    (directory / "text.jsonl").write_text(json.dumps({"text": TEXT[:1000]}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (directory / "zoo_mc.yaml").write_text(
        f"task: zoo_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "zoo_text.yaml").write_text(
        f"task: zoo_text\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'text.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")


def test_llmzoo_evaluate_matches_hflm_on_local_tasks(lms, hf_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    write_tasks(tmp_path, hf_dir)
    (tmp_path / "text.txt").write_text(TEXT[:1000])
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--ckpt_path", str(hf_dir), "--tasks", "zoo_mc,zoo_text", "--include_path", str(tmp_path),
              "--files", str(tmp_path / "text.txt"), "--stride", str(CONTEXT), "--batch_size", "4",
              "--output", str(out)])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "|zoo_mc" in printed.replace(" ", "") and "bits/byte" in printed
    ours = json.loads(out.read_text())
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    theirs = simple_evaluate(model=lms[0], tasks=["zoo_mc", "zoo_text"], task_manager=manager, log_samples=False)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["harness"]["results"]["zoo_mc"][metric] == theirs["results"]["zoo_mc"][metric]
    assert theirs["results"]["zoo_mc"]["acc,none"] not in (0.0, 1.0)  # a score that could differ
    bpb = theirs["results"]["zoo_text"]["bits_per_byte,none"]
    assert ours["harness"]["results"]["zoo_text"]["bits_per_byte,none"] == pytest.approx(bpb, abs=1e-6)
    # --files with disjoint windows (stride = context) reads the text exactly as the harness's rolling windows do
    assert ours["files"]["total"]["bpb"] == pytest.approx(bpb, abs=1e-6)
    assert ours["files"]["total"]["bytes"] == len(TEXT[:1000].encode()) and math.isfinite(ours["files"]["total"]["ppl"])
