"""Every architecture: shapes, causality, KV-cache decoding, checkpoints, and a real Trainer run."""

import math

import lightning as L
import pytest
import torch
from tiny import TINY_CONFIGS, tiny_model

from llmzoo import ARCHITECTURES, GPT2, Llama, Transformer
from llmzoo.callbacks import Checkpoint
from llmzoo.data import TextDataModule
from llmzoo.layers import LearnedPositions, SinusoidalPositions

ARCHS = sorted(TINY_CONFIGS)


@pytest.mark.parametrize("name", ARCHS)
def test_logits_shape(name):
    model = tiny_model(name).eval()
    assert model(torch.randint(0, 97, (3, 11))).shape == (3, 11, 97)


@pytest.mark.parametrize("name", ARCHS)
def test_causality(name):
    """Changing token t changes logits at t and after, never before."""
    model = tiny_model(name).eval()
    ids = torch.randint(0, 97, (2, 24))
    changed = ids.clone()
    t = 13
    changed[:, t] = (ids[:, t] + 1) % 97
    with torch.no_grad():
        before, after = model(ids), model(changed)
    assert torch.equal(before[:, :t], after[:, :t])
    assert not torch.allclose(before[:, t:], after[:, t:])


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_with_kv_cache_equals_without(name):
    model = tiny_model(name)
    prompt = torch.randint(0, 97, (2, 10))  # longer than Mistral's window of 8; output runs far past it
    cached = model.generate(prompt, max_new_tokens=40)
    uncached = model.generate(prompt, max_new_tokens=40, use_cache=False)
    assert cached.shape == (2, 50)
    assert torch.equal(cached, uncached)
    assert model.kv_cache_length == 0  # the cache is gone after generate


@pytest.mark.parametrize("name", ["GPT2", "Llama", "Mistral"])
def test_left_padded_generation_equals_each_prompt_alone(name):
    model = tiny_model(name)
    long, short = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    together = model.generate(batch, max_new_tokens=12, attention_mask=mask)
    assert torch.equal(together[0], model.generate(long, max_new_tokens=12)[0])
    assert torch.equal(together[1, 4:], model.generate(short, max_new_tokens=12)[0])


def test_sampling_is_reproducible_with_a_generator_and_stops_at_eos():
    model = tiny_model("Llama")
    prompt = torch.randint(0, 97, (2, 4))
    run = lambda seed: model.generate(prompt, 20, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    greedy = model.generate(prompt, 20)
    eos = int(greedy[0, 6])
    stopped = model.generate(prompt, 20, eos_token_id=eos)
    assert (stopped[0, 6:] == eos).all()


def test_transformer_scales_embeddings_and_uses_sinusoidal_positions():
    model = Transformer(**TINY_CONFIGS["Transformer"])
    assert isinstance(model.positions, SinusoidalPositions) and model.embed_scale == math.sqrt(32)
    assert not model.blocks[0].prenorm and isinstance(model.norm, torch.nn.Identity)
    assert model.lm_head.weight is model.embed.weight
    gpt2 = GPT2(**TINY_CONFIGS["GPT2"])
    assert isinstance(gpt2.positions, LearnedPositions) and gpt2.embed_scale == 1.0 and gpt2.blocks[0].prenorm


def test_num_parameters_and_memory_footprint():
    model = GPT2(**TINY_CONFIGS["GPT2"])
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    assert model.num_parameters(non_embedding=True) == total - 97 * 32 - 64 * 32
    assert model.memory_footprint() == {"fp32": 4 * total, "bf16": 2 * total, "int8": total, "held": 4 * total}
    # the GPT-2 small shape has the well-known 124M parameters
    with torch.device("meta"):
        small = GPT2(vocab_size=50257, embed_dim=768, num_heads=12, num_layers=12, max_position_embeddings=1024)
    assert small.num_parameters() == 124_439_808


def test_context_length_is_enforced():
    model = tiny_model("Llama")
    with pytest.raises(ValueError, match="65 tokens exceed max_position_embeddings=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_weight_decay_only_on_matrices():
    model = tiny_model("GPT2")
    model.trainer = type("T", (), {"max_steps": 100})()
    optimizer = model.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert any(p is model.embed.weight for p in no_decay["params"])
    assert any(p is model.positions.weight for p in no_decay["params"])


def test_warmup_cosine_schedule():
    from llmzoo.models.base import warmup_cosine

    lrs = [warmup_cosine(s, warmup_steps=10, decay_steps=100, min_ratio=0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55)
    assert lrs[100] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)


def overfit(model, steps: int = 120) -> float:
    """Train on one batch of 4 random windows with a real Trainer; return the final loss on it."""
    batch = torch.randint(0, 97, (4, 17))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(list(batch), batch_size=4))
    model.eval()
    with torch.no_grad():
        return model.token_nll(batch)[0].item()


@pytest.mark.parametrize("name", ARCHS)
def test_overfits_one_batch_with_lightning_trainer(name):
    model = tiny_model(name, learning_rate=1e-2, warmup_steps=10, weight_decay=0.0)
    loss = overfit(model)
    assert loss < 0.1, f"{name} did not overfit: loss {loss:.3f}"


@pytest.mark.parametrize("name", ARCHS)
def test_load_from_checkpoint_needs_no_arguments(name, tmp_path):
    model = tiny_model(name, learning_rate=1e-3)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    data = torch.utils.data.DataLoader(list(torch.randint(0, 97, (2, 9))), batch_size=2)
    trainer.fit(model, data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = ARCHITECTURES[name].load_from_checkpoint(path)
    assert dict(loaded.hparams) == dict(model.hparams)
    ids = torch.randint(0, 97, (1, 12))
    assert torch.equal(loaded.eval()(ids), model.eval()(ids))


def test_subclass_overrides_one_layer():
    """A developer swaps one layer by overriding a hook; everything else is inherited."""

    class GeluLlama(Llama):
        def make_mlp(self, layer):
            from llmzoo.layers import MLP

            return MLP(self.hparams.embed_dim, 64, activation="gelu", bias=False)

    model = GeluLlama(**TINY_CONFIGS["Llama"])
    assert model.blocks[1].mlp.up.out_features == 64
    assert model(torch.randint(0, 97, (1, 5))).shape == (1, 5, 97)


def test_flops_per_token_counts_active_parameters_and_attention():
    gpt2 = GPT2(**TINY_CONFIGS["GPT2"])
    d, layers, vocab = 32, 2, 97
    matmul = layers * (3 * d * d + d * d + 2 * 4 * d * d) + vocab * d  # qkv, out, mlp up/down, head
    assert gpt2.flops_per_token(16) == 6 * matmul + 12 * layers * d * 16
    mixtral = tiny_model("Mixtral")  # 4 experts, top-2, window 8
    dense = tiny_model("Mistral")
    expert_params = 3 * 32 * 48
    router = 32 * 4
    active_difference = layers * (router + 2 * expert_params - expert_params)  # k=2 experts instead of one MLP
    assert mixtral.flops_per_token(64) - dense.flops_per_token(64) == 6 * active_difference
    assert dense.flops_per_token(64) - dense.flops_per_token(8) == 0  # keys capped by the window of 8


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    batch = torch.randint(0, 97, (2, 17))
    plain = tiny_model("Llama").train()
    checkpointed = tiny_model("Llama", activation_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    losses = []
    for model in (plain, checkpointed):
        loss = model.token_nll(batch)[0]
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1])
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


@pytest.fixture(scope="module")
def precision_runs(tmp_path_factory) -> dict:
    """The tiny Llama trained 20 steps from the same weights on the same batches of Python-like text in each
    precision Lightning offers on CPU: per precision, the trainer, the model, its data and its last.ckpt."""
    tmp = tmp_path_factory.mktemp("precision")
    (tmp / "corpus.txt").write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
    runs = {}
    for precision in ("32-true", "bf16-mixed", "bf16-true"):
        data = TextDataModule(str(tmp / "corpus.txt"), seq_len=32, batch_size=8, tokenizer="char",
                              cache_dir=str(tmp / "cache"))
        torch.manual_seed(0)
        model = tiny_model("Llama", vocab_size=data.vocab_size, learning_rate=1e-2, warmup_steps=0)
        trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=20, val_check_interval=20,
                            num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[Checkpoint(dirpath=tmp / precision)])
        trainer.fit(model, data)
        runs[precision] = dict(trainer=trainer, model=model, data=data, ckpt=tmp / precision / "last.ckpt")
    return runs


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_trains_on_cpu_to_the_loss_of_float32(precision_runs, precision):
    """Losses after 20 steps (about 1.4 nats, from ln(vocab) = 3.6) within 2% of the float32 run's; bf16-true
    holds the weights in bf16 (bf16-mixed keeps float32 ones) and its checkpoint loads; the validation loss is
    summed in float64 whatever the weights' dtype."""
    run, reference = precision_runs[precision], precision_runs["32-true"]["trainer"].callback_metrics
    metrics = run["trainer"].callback_metrics
    for name in ("train/loss", "val/loss"):
        assert math.isfinite(metrics[name]) and metrics[name] == pytest.approx(float(reference[name]), rel=0.02)
    model, dtype = run["model"], torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad(), run["trainer"].precision_plugin.forward_context():  # autocast for bf16-mixed
        sums = [model.token_nll(batch, reduction="sum")[:2] for batch in run["data"].val_dataloader()]
    exact = sum(nll.double() for nll, _ in sums) / sum(count for _, count in sums)
    assert float(metrics["val/loss"]) == pytest.approx(exact.item(), rel=1e-6)
    loaded = Llama.load_from_checkpoint(run["ckpt"])
    assert all(torch.equal(a, b.float()) for a, b in zip(loaded.parameters(), model.parameters(), strict=True))


@pytest.mark.slow
def test_compiled_blocks_train_and_match_eager():
    """torch.compile on CPU (needs a C++ compiler): the compiled model gives the eager model's loss."""
    batch = torch.randint(0, 97, (4, 17))
    eager = tiny_model("Llama")
    compiled = tiny_model("Llama", compile=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    assert all(block._compiled_call_impl is not None for block in compiled.blocks)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    with torch.no_grad():
        assert torch.allclose(compiled.token_nll(batch)[0], eager.token_nll(batch)[0], atol=1e-5)
    assert overfit(compiled, steps=30) < overfit(tiny_model("Llama"), steps=1)


def saved_checkpoint(model, path):
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=path.parent)
    trainer.fit(model, torch.utils.data.DataLoader(list(torch.randint(0, 97, (2, 9))), batch_size=2))
    trainer.save_checkpoint(path)
    return path


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    from llmzoo import CausalLM, GPT, Mixtral

    path = saved_checkpoint(tiny_model("Mixtral"), tmp_path / "mixtral.ckpt")
    with pytest.raises(ValueError, match="holds a Mixtral model, not a Llama: load it with Mixtral.load_from_checkpoint"):
        Llama.load_from_checkpoint(path)
    with pytest.raises(ValueError, match="holds a Mixtral model, not a GPT"):
        GPT.load_from_checkpoint(path)
    assert type(CausalLM.load_from_checkpoint(path)) is Mixtral  # the base class picks the stored one
    assert type(Mixtral.load_from_checkpoint(path)) is Mixtral


def test_corrupted_truncated_and_unsafe_checkpoints_are_refused(tmp_path):
    path = saved_checkpoint(tiny_model("GPT2"), tmp_path / "gpt2.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.ckpt: the file is truncated, corrupted or not a PyTorch checkpoint"):
        GPT2.load_from_checkpoint(truncated)
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(ValueError, match="truncated, corrupted"):
        GPT2.load_from_checkpoint(garbage)

    class Payload:  # unpickling it would run os.system
        def __reduce__(self):
            import os
            return os.system, ("touch " + str(tmp_path / "pwned"),)

    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "llmzoo_architecture": "llmzoo.models.gpt2.GPT2", "evil": Payload()}, crafted)
    with pytest.raises(ValueError, match="refusing to load .*crafted.ckpt.*only load checkpoints you trust"):
        GPT2.load_from_checkpoint(crafted)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPT2.load_from_checkpoint(tmp_path / "missing.ckpt")
