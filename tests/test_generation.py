"""Decoding: logits processors, argument checks, Hugging Face parity of greedy and beam search, batches of
padded prompts, the KV cache's rollback / reorder / rolling buffer, speculative decoding (greedy identity
and a statistical test of the sampled distribution), seeds, stopping, streaming."""

import copy
import itertools

import pytest
import torch
from tiny import TINY_CONFIGS, tiny_model

from llmzoo.generation import (GenerationConfig, TextStream, apply_repetition_penalty, apply_temperature, generate,
                               min_p_filter, process_logits, room_after_prompts, sample, stop_string_hits, stream,
                               top_k_filter, top_p_filter)
from llmzoo.layers import CausalSelfAttention, KVCache

ARCHS = sorted(TINY_CONFIGS)
INF = float("-inf")


def padded_batch(lengths, vocab=97, total=None, pad=0):
    """Random prompts of ``lengths``, left-padded with ``pad`` into ``[B, total]``, and their attention mask."""
    total = total or max(lengths)
    prompts = [torch.randint(1, vocab, (n,)) for n in lengths]
    ids = torch.full((len(lengths), total), pad)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, total - len(prompt):] = prompt
        mask[row, total - len(prompt):] = 1
    return prompts, ids, mask


# --------------------------------------------------------------------------------------------- logits processors
def hf_processor(name, *args, **kwargs):
    transformers = pytest.importorskip("transformers")
    return getattr(transformers.generation.logits_process, name)(*args, **kwargs)


def test_temperature_divides_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    assert torch.equal(apply_temperature(logits, 0.5), torch.tensor([[4.0, -2.0, 1.0]]))
    logits = torch.randn(3, 50)
    assert torch.allclose(apply_temperature(logits, 0.7), hf_processor("TemperatureLogitsWarper", 0.7)(None, logits))


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    assert torch.equal(top_k_filter(logits, 2), torch.tensor([[INF, 3.0, INF, 3.0, INF]]))
    assert torch.equal(top_k_filter(logits, 3), torch.tensor([[INF, 3.0, 2.0, 3.0, INF]]))
    assert torch.equal(top_k_filter(logits, 10), logits)  # k beyond the vocabulary keeps everything
    logits = torch.randn(4, 50)
    assert torch.equal(top_k_filter(logits, 7), hf_processor("TopKLogitsWarper", 7)(None, logits))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.1) == [True, False, False, False]  # the most likely token always stays
    assert kept(1.0) == [True] * 4
    logits = torch.randn(4, 50)
    assert torch.equal(top_p_filter(logits, 0.9), hf_processor("TopPLogitsWarper", 0.9)(None, logits))


def test_min_p_drops_tokens_far_below_the_best():
    logits = torch.tensor([[0.6, 0.3, 0.07, 0.03]]).log()
    kept = torch.isfinite(min_p_filter(logits, 0.1))[0].tolist()  # threshold 0.06
    assert kept == [True, True, True, False]
    assert torch.isfinite(min_p_filter(logits, 1.0))[0].tolist() == [True, False, False, False]
    logits = torch.randn(4, 50)
    assert torch.equal(min_p_filter(logits, 0.2), hf_processor("MinPLogitsWarper", 0.2)(None, logits))


def test_repetition_penalty_multiplies_negative_and_divides_positive_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 4.0]])
    previous = torch.tensor([[0, 1, 1]])  # duplicates count once
    assert torch.equal(apply_repetition_penalty(logits, previous, 2.0), torch.tensor([[1.0, -2.0, 0.5, 4.0]]))
    logits, previous = torch.randn(3, 50), torch.randint(0, 50, (3, 12))
    expected = hf_processor("RepetitionPenaltyLogitsProcessor", 1.3)(previous, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, previous, 1.3), expected)


def test_processors_compose_in_hugging_face_order_and_greedy_skips_the_sampling_ones():
    logits, previous = torch.randn(2, 40), torch.randint(0, 40, (2, 5))
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, min_p=0.05, repetition_penalty=1.2)
    expected = apply_repetition_penalty(logits, previous, 1.2)
    expected = min_p_filter(top_p_filter(top_k_filter(apply_temperature(expected, 0.7), 10), 0.8), 0.05)
    assert torch.equal(process_logits(logits, config, previous), expected)
    greedy = GenerationConfig(temperature=0.7, top_k=1, repetition_penalty=1.2)
    assert torch.equal(process_logits(logits, greedy, previous), apply_repetition_penalty(logits, previous, 1.2))


def test_sample_draws_in_proportion_to_unnormalised_weights():
    weights = torch.tensor([2.0, 0.0, 1.0, 1.0]).expand(20000, 4)
    counts = torch.bincount(sample(weights, torch.Generator().manual_seed(0)), minlength=4)
    assert counts[1] == 0
    # binomial standard deviations: 20000 * 0.5 +- 71, 20000 * 0.25 +- 61; 5 sigma
    assert abs(counts[0] - 10000) < 355 and abs(counts[2] - 5000) < 310 and abs(counts[3] - 5000) < 310


# --------------------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("options,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0 when sampling, got 0.0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=0), "top_k must be an integer >= 1, got 0"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2, do_sample=True), "beam search with do_sample=True"),
    (dict(early_stopping="sometimes"), "early_stopping must be True, False or 'never'"),
    (dict(num_draft_tokens=0), "num_draft_tokens must be an integer >= 1"),
    (dict(stop_strings=["\n"]), "stop_strings need pad_token_id or eos_token_id"),
])
def test_bad_options_are_refused_with_one_line(options, message):
    with pytest.raises(ValueError, match=message) as error:
        GenerationConfig(**options)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=message):  # the same checks through generate's keywords
        generate(tiny_model("Llama"), torch.zeros(1, 3, dtype=torch.long), **options)


def test_greedy_decoding_ignores_the_sampling_options():
    model, prompt = tiny_model("Llama"), torch.randint(0, 97, (2, 4))
    assert torch.equal(generate(model, prompt, temperature=0.0, top_k=1, top_p=0.1, min_p=0.5),
                       generate(model, prompt))


def test_context_rule_prompt_plus_new_tokens_must_fit():
    """The rule: the (padded) prompt plus max_new_tokens must fit in max_position_embeddings (64); nothing is cut."""
    model = tiny_model("Llama")
    assert generate(model, torch.zeros(1, 60, dtype=torch.long), max_new_tokens=4).shape == (1, 64)
    with pytest.raises(ValueError, match="prompt of 60 tokens \\+ max_new_tokens=5 exceeds the model's context of 64 "
                                         "tokens: lower max_new_tokens to 4"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ValueError, match="prompt of 70 tokens .* shorten the prompt to at most 63 tokens"):
        generate(model, torch.zeros(1, 70, dtype=torch.long), max_new_tokens=1)
    draft = tiny_model("Llama", max_position_embeddings=32)
    with pytest.raises(ValueError, match="exceeds the draft_model's context of 32 tokens"):
        generate(model, torch.zeros(1, 30, dtype=torch.long), max_new_tokens=4, draft_model=draft)


def test_room_after_prompts_names_the_prompt_that_does_not_fit():
    assert room_after_prompts([3, 10, 5], 64) == 54
    assert room_after_prompts([63], 64) == 1
    with pytest.raises(ValueError, match="^prompt 2 has 64 tokens, but the model's context of 64 tokens must hold it "
                                         "and at least one new token: shorten the prompt to at most 63 tokens$"):
        room_after_prompts([3, 64, 5], 64)
    with pytest.raises(ValueError, match="^the prompt has 80 tokens"):
        room_after_prompts([80], 64)


def test_bad_inputs_are_refused():
    model = tiny_model("Llama")
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids of shape \[batch, length >= 1\]"):
        generate(model, ids[0])
    with pytest.raises(ValueError, match="attention_mask must mark left padding"):
        generate(model, ids, attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask has shape \\(2, 3\\), expected \\(2, 4\\)"):
        generate(model, ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="stop_strings need decode="):
        generate(model, ids, stop_strings=["x"], eos_token_id=0)
    with pytest.raises(ValueError, match="draft_model has vocab_size=50, the model 97"):
        generate(model, ids, draft_model=tiny_model("Llama", vocab_size=50))
    with pytest.raises(ValueError, match="draft_model is the model itself"):
        generate(model, ids, draft_model=model)
    with pytest.raises(ValueError, match="with num_beams > 1 is not supported"):
        generate(model, ids, draft_model=tiny_model("Llama"), num_beams=2)
    with pytest.raises(ValueError, match="either seed or generator"):
        generate(model, ids, seed=1, generator=torch.Generator())


# --------------------------------------------------------------------------------------------- Hugging Face parity
HF_FAMILIES = ["gpt2", "llama-gqa", "mistral-window"]  # tiny configs of tests/test_parity.py; Mistral's window is 5
HF_SETTINGS = [  # (our keywords; Hugging Face's are the same plus do_sample=False)
    dict(),
    dict(eos="early"),
    dict(num_beams=4),
    dict(num_beams=4, eos="early"),
    dict(num_beams=4, eos="early", length_penalty=0.0),
    dict(num_beams=4, eos="early", length_penalty=2.0, early_stopping="never"),
    dict(num_beams=4, eos="early", early_stopping=True),
    dict(num_beams=3, eos="early", length_penalty=-1.0, repetition_penalty=1.5),
    dict(repetition_penalty=1.3, eos="early"),
]


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_greedy_and_beam_search_equal_hugging_face(family):
    """Same weights, same tokens: greedy and num_beams=3/4 with every length_penalty / early_stopping rule,
    end-of-sequence tokens and repetition penalty, on a left-padded batch; 24 new tokens run past Mistral's window."""
    from test_parity import VOCAB, hf_model

    from llmzoo.hf import from_hf

    reference = hf_model(family)
    model = from_hf(reference).eval()
    _, ids, mask = padded_batch([9, 5, 7], vocab=VOCAB, pad=3)
    eos = int(generate(model, ids, attention_mask=mask, max_new_tokens=10)[0, -1])  # a token greedy emits
    differs = 0
    for setting in HF_SETTINGS:
        ours = dict(setting)
        if ours.pop("eos", None):
            ours.update(eos_token_id=eos, pad_token_id=eos)
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                                      **{"eos_token_id": None, **ours})
        actual = generate(model, ids, attention_mask=mask, max_new_tokens=24, **ours)
        assert torch.equal(actual, expected), (family, setting)
        differs += not torch.equal(actual, generate(model, ids, attention_mask=mask, max_new_tokens=24))
    assert differs >= 4, "the settings should not all reduce to greedy decoding"


# --------------------------------------------------------------------------------------------- batches and the cache
@pytest.mark.parametrize("name", ["GPT2", "Llama", "Mistral", "Mixtral"])
@pytest.mark.parametrize("options", [dict(num_beams=3), dict(repetition_penalty=1.5),
                                     dict(num_beams=2, repetition_penalty=1.5)], ids=["beams", "penalty", "both"])
def test_left_padded_batch_equals_each_prompt_alone(name, options):
    """Padding changes nothing: not the positions, not the attention, not the repetition penalty."""
    model = tiny_model(name)
    prompts, ids, mask = padded_batch([9, 3, 6])
    together = generate(model, ids, attention_mask=mask, max_new_tokens=14, **options)
    for row, prompt in enumerate(prompts):
        alone = generate(model, prompt[None], max_new_tokens=14, **options)
        assert torch.equal(together[row, ids.shape[1]:], alone[0, len(prompt):]), row


@pytest.mark.parametrize("name", ARCHS)
def test_beam_search_with_kv_cache_equals_without(name):
    """The cache follows the beams (reorder) and Mistral's rolling buffer (window 8 < 36 tokens) too."""
    model = tiny_model(name)
    _, ids, mask = padded_batch([10, 4])
    cached = generate(model, ids, attention_mask=mask, max_new_tokens=26, num_beams=4, eos_token_id=5)
    assert torch.equal(cached, generate(model, ids, attention_mask=mask, max_new_tokens=26, num_beams=4,
                                        eos_token_id=5, use_cache=False))


def test_rolling_buffer_memory_stays_flat_past_the_window():
    """Mistral's cache holds `sliding_window` slots however long the output; Llama's grows with it."""
    seen = {}

    def cache_slots(model, new_tokens, **options):
        slots = []
        generate(model, torch.randint(0, 97, (1, 4)), max_new_tokens=new_tokens,
                 streamer=lambda _: slots.append(model.blocks[0].attention.kv_cache.k.shape[2]), **options)
        return set(slots)

    mistral = tiny_model("Mistral", max_position_embeddings=256)
    llama = tiny_model("Llama", max_position_embeddings=256)
    for new_tokens in (20, 250):
        seen[new_tokens] = cache_slots(mistral, new_tokens), cache_slots(llama, new_tokens)
        assert seen[new_tokens][0] == {8}  # the window
        assert seen[new_tokens][1] == {4 + new_tokens}  # preallocated once for the whole call
    draft = tiny_model("Mistral", max_position_embeddings=256, num_layers=1)
    assert cache_slots(mistral, 100, draft_model=draft, num_draft_tokens=3) == {8 + 3}  # headroom for rollback


@pytest.mark.parametrize("window,chunks,rollbacks", [(None, [6, 3, 4, 2], [2, 3, 1]), (4, [6, 3, 4, 2], [2, 3, 1]),
                                                     (3, [4, 4, 5, 1, 4], [3, 0, 3, 1])])
def test_kv_cache_rollback_then_continue_equals_the_kept_sequence(window, chunks, rollbacks):
    """Feed chunks, take back some slots after each, go on: outputs equal a full forward of what was kept,
    including a rolling buffer that wrapped around (window 3/4 + rollback headroom)."""
    attn = CausalSelfAttention(32, 4, 2, sliding_window=window).eval()
    kept, outputs = [], []
    attn.setup_kv_cache(2, 64, max_rollback=3)
    for n, back in itertools.zip_longest(chunks, rollbacks, fillvalue=0):
        x = torch.randn(2, n, 32)
        out = attn(x)
        kept.append(x[:, :n - back])
        outputs.append(out[:, :n - back])
        attn.kv_cache.truncate(attn.kv_cache.length - back)
    attn.kv_cache = None
    assert torch.allclose(torch.cat(outputs, 1), attn(torch.cat(kept, 1)), atol=1e-5)


def test_kv_cache_refuses_a_rollback_beyond_its_headroom_and_reorders_rows():
    cache = KVCache(3, num_kv_heads=1, head_dim=2, max_length=20, window=4, max_rollback=2)
    assert cache.rolling and cache.size == 6
    cache.update(torch.randn(3, 1, 9, 2), torch.randn(3, 1, 9, 2))
    with pytest.raises(ValueError, match="cannot roll back 3 slots of a rolling KV cache with 2 spare"):
        cache.truncate(6)
    cache.truncate(7)
    assert cache.length == 7 and sorted(cache.slots.tolist()) == [-1, -1, 3, 4, 5, 6]
    before = cache.k.clone()
    cache.reorder(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.k, before[[2, 2, 0]])


# --------------------------------------------------------------------------------------------- speculative decoding
def sharpened(model, factor=4.0):
    """Scale the output head so that greedy tokens are clear winners (a tiny random model is nearly uniform)."""
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    return model


@pytest.mark.parametrize("name", ARCHS)
def test_speculative_greedy_equals_target_greedy(name):
    target, draft = sharpened(tiny_model(name)), sharpened(tiny_model(name, num_layers=1))
    _, ids, mask = padded_batch([9, 4, 6])
    expected = generate(target, ids, attention_mask=mask, max_new_tokens=40)
    for k, use_cache in [(1, True), (4, True), (3, False)]:
        actual = generate(target, ids, attention_mask=mask, max_new_tokens=40, draft_model=draft,
                          num_draft_tokens=k, use_cache=use_cache)
        assert torch.equal(actual, expected), (k, use_cache)
    eos = int(expected[1, 15])  # rows stop on their own in the middle of accepted runs
    assert torch.equal(generate(target, ids, attention_mask=mask, max_new_tokens=40, draft_model=draft,
                                eos_token_id=eos),
                       generate(target, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=eos))


def test_a_perfect_draft_has_every_token_accepted():
    target = tiny_model("Mistral")
    chunks = []
    out = generate(target, torch.randint(0, 97, (1, 5)), max_new_tokens=23, draft_model=copy.deepcopy(target),
                   num_draft_tokens=4, streamer=lambda chunk: chunks.append(chunk.shape[1]))
    assert chunks == [5, 5, 5, 5, 3]  # 4 drafted + 1 of the target's own per step; the last step is cut short
    assert torch.equal(out, generate(target, out[:, :5], max_new_tokens=23))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit: P(chi2 >= statistic) with len(probs) - 1 degrees of freedom."""
    expected = probs * counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((len(probs) - 1) / 2), statistic / 2).item()


def test_speculative_sampling_keeps_the_target_distribution():
    """Vocabulary of 4, three new tokens, two drafted per step: the 64 sequences must follow the target's
    exact distribution (computed by enumeration) under a chi-square test at the 0.1% level. The draft's
    own distribution is far from it (total variation > 0.4) and the same test rejects samples from it,
    so the test can fail."""
    vocab, new, temperature = 4, 3, 0.9
    target = sharpened(tiny_model("Llama", vocab_size=vocab, num_layers=1), 3.0)
    torch.manual_seed(4)  # a draft drawn far from the target (random pairs of these models: total variation 0.3-0.4)
    draft = sharpened(tiny_model("Llama", vocab_size=vocab, num_layers=1), 3.0)
    prompt = torch.tensor([[1, 2, 3]])
    sequences = torch.tensor(list(itertools.product(range(vocab), repeat=new)))  # [64, 3]

    def exact(model):  # P(sequence) of the temperature-scaled model
        with torch.no_grad():
            ids = torch.cat([prompt.expand(len(sequences), -1), sequences], 1)
            logp = (model(ids[:, :-1])[:, prompt.shape[1] - 1:] / temperature).log_softmax(-1)
        return logp.gather(-1, sequences[..., None]).sum((1, 2)).exp()

    def counts(out):
        return torch.bincount((out[:, -new:] * torch.tensor([vocab ** 2, vocab, 1])).sum(1), minlength=vocab ** new)

    p, q = exact(target), exact(draft)
    assert 0.5 * (p - q).abs().sum() > 0.4
    generator, sizes, observed = torch.Generator().manual_seed(0), [], 0
    for _ in range(500):  # 2000 samples, in batches of 4 rows that accept runs of different lengths
        observed = observed + counts(generate(target, prompt.expand(4, -1), max_new_tokens=new, do_sample=True,
                                              temperature=temperature, draft_model=draft, num_draft_tokens=2,
                                              generator=generator, streamer=lambda c: sizes.append(c.shape[1])))
    assert set(sizes) == {1, 2, 3}  # rejections at the first and second draft token, and full acceptance
    assert chi2_pvalue(observed, p) > 1e-3
    from_draft = counts(generate(draft, prompt.expand(2000, -1), max_new_tokens=new, do_sample=True,
                                 temperature=temperature, generator=generator))
    assert chi2_pvalue(from_draft, p) < 1e-3


# ------------------------------------------------------------------------------------- seeds, stopping, streaming
def test_seed_makes_sampling_reproducible_without_touching_the_global_generator():
    model = tiny_model("Llama")
    prompt = torch.randint(0, 97, (2, 4))
    run = lambda **kw: generate(model, prompt, max_new_tokens=20, do_sample=True, top_p=0.9, **kw)  # noqa: E731
    state = torch.get_rng_state()
    assert torch.equal(run(seed=1), run(seed=1)) and not torch.equal(run(seed=1), run(seed=2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(run(seed=3), run(generator=torch.Generator().manual_seed(3)))
    draft = tiny_model("Llama", num_layers=1)
    assert torch.equal(run(seed=4, draft_model=draft), run(seed=4, draft_model=draft))


def test_rows_stop_on_their_own_and_decoding_ends_when_all_have():
    model = tiny_model("GPT2")
    prompt = torch.randint(0, 97, (3, 5))
    free = generate(model, prompt, max_new_tokens=30)[:, 5:].tolist()
    eos = [free[1][4], free[2][20]]  # any of two tokens ends a row
    ends = [next((i + 1 for i, t in enumerate(row) if t in eos), None) for row in free]
    assert ends[1] <= 5
    stopped = generate(model, prompt, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    new = 30 if None in ends else max(ends)
    assert stopped.shape == (3, 5 + new)
    for row, end in enumerate(ends):
        end = end or 30
        assert stopped[row, 5:5 + end].tolist() == free[row][:end]
        assert set(stopped[row, 5 + end:].tolist()) <= {0}


def test_all_rows_finished_ends_the_loop_early():
    model = tiny_model("Llama")
    prompt = torch.randint(0, 97, (1, 5))
    free = generate(model, prompt, max_new_tokens=30)[0, 5:].tolist()
    eos = free[8]
    assert generate(model, prompt, max_new_tokens=30, eos_token_id=eos).shape == (1, 5 + free.index(eos) + 1)


def unique_chars(ids):
    """A decode function with one character per token."""
    return "".join(chr(0x100 + i) for i in ids)


@pytest.mark.parametrize("strategy", ["greedy", "beams", "speculative"])
def test_stop_strings_end_rows_on_the_generated_text(strategy):
    model = sharpened(tiny_model("Llama"))
    options = {"greedy": {}, "beams": dict(num_beams=3),
               "speculative": dict(draft_model=tiny_model("Llama", num_layers=1))}[strategy]
    prompt = torch.randint(0, 97, (2, 4))
    free = generate(model, prompt, max_new_tokens=30, **options)
    # a one-token stop string acts as an end-of-sequence token
    token = int(free[0, 4 + 9])
    assert torch.equal(generate(model, prompt, max_new_tokens=30, stop_strings=[unique_chars([token])],
                                decode=unique_chars, pad_token_id=96, **options),
                       generate(model, prompt, max_new_tokens=30, eos_token_id=token, pad_token_id=96, **options))
    if strategy == "beams":
        return  # beams that stop change which hypothesis wins; the identity above is the test
    stop = unique_chars(free[0, 4 + 6:4 + 8].tolist())  # a string spanning new tokens 7 and 8
    out = generate(model, prompt, max_new_tokens=30, stop_strings=[stop], decode=unique_chars, pad_token_id=96,
                   **options)
    text = unique_chars(free[0, 4:].tolist())
    end = text.index(stop) + len(stop)
    assert unique_chars(out[0, 4:4 + end].tolist()) == text[:end]
    assert set(out[0, 4 + end:].tolist()) <= {96}


def test_stop_string_hits_marks_the_first_token_that_completes_one():
    generated = torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    hits = stop_string_hits(generated, 3, [unique_chars([2, 3]), "x"], unique_chars)
    assert hits.tolist() == [[False, True, False], [False, False, False]]


def test_stream_yields_what_generate_returns_lazily_and_cleans_up():
    model = tiny_model("Mistral").train()
    prompt = torch.randint(0, 97, (2, 4))
    chunks = stream(model, prompt, max_new_tokens=12)
    assert model.training and model.kv_cache_length == 0  # nothing ran yet
    first = next(chunks)
    assert first.shape == (2, 1) and not model.training and model.kv_cache_length == 4
    chunks.close()  # a consumer that stops early
    assert model.training and model.kv_cache_length == 0
    assert torch.equal(torch.cat([prompt, *stream(model, prompt, max_new_tokens=12)], 1),
                       generate(model, prompt, max_new_tokens=12))
    beams = list(stream(model, prompt, max_new_tokens=12, num_beams=2))
    assert len(beams) == 1 and beams[0].shape == (2, 12)


def test_text_stream_holds_back_split_utf8_characters():
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731  byte-level "tokenizer"
    text = TextStream(decode, skip=[0])
    pieces = [text.push(list(chunk)) for chunk in (b"h", "é".encode()[:1], "é".encode()[1:] + b"!", b"\x00")]
    assert pieces == ["h", "", "é!", ""]
    assert text.push([0xE2]) == "" and text.flush() == "\ufffd"


def test_unpadded_decode_steps_build_no_attention_mask(monkeypatch):
    """The fast path: without padding, prefill is SDPA's causal kernel and each decode step attends over the
    whole cache, so no mask is ever built (a sliding window needs one only until its buffer is full)."""
    import llmzoo.layers.attention as attention

    built = []
    original = attention.slot_mask
    monkeypatch.setattr(attention, "slot_mask", lambda *a, **k: built.append(1) or original(*a, **k))
    generate(tiny_model("Llama"), torch.randint(0, 97, (2, 6)), max_new_tokens=20)
    assert built == []
    generate(tiny_model("Mistral"), torch.randint(0, 97, (2, 6)), max_new_tokens=20)  # window 8, 2 layers
    assert len(built) == 2  # 2 layers, once: at slot 6 the rolling buffer of 8 still has an empty entry
