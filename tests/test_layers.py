"""Unit tests of the shared layers against plain reference formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmzoo.layers import (MLP, CausalSelfAttention, KVCache, MoE, RMSNorm, RotaryEmbedding, SinusoidalPositions,
                           SwiGLU, apply_rope, load_balancing_loss, rope_inverse_frequencies, slot_mask)


def test_sinusoidal_formula():
    d, positions = 16, 50
    pe = SinusoidalPositions(positions, d)
    assert list(pe.parameters()) == [] and "table" not in pe.state_dict()
    table = pe(torch.arange(positions)[None])[0]
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rmsnorm_in_float32_then_cast_before_weight():
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.linspace(0.5, 2.0, 8)
    x = torch.randn(3, 8, dtype=torch.bfloat16) * 30
    xf = x.float()
    expected = norm.weight * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = norm.to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected.float(), atol=1e-2)


def test_rope_rotates_pairs_and_preserves_norm():
    rope = RotaryEmbedding(8, theta=10000.0)
    q = torch.randn(1, 2, 5, 8)
    cos, sin = rope(torch.arange(5)[None])
    out = apply_rope(q, cos, sin)
    assert torch.allclose(out.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    # position 0 is the identity; relative: <R(m)q, R(n)k> depends only on m - n
    assert torch.allclose(out[:, :, 0], q[:, :, 0])
    k = torch.randn(8)
    def dot(m, n):
        c, s = rope(torch.tensor([[m, n]]))
        rq = apply_rope(q[:, :1, :1].expand(1, 1, 2, 8).clone(), c, s)[0, 0, 0]
        rk = apply_rope(k.view(1, 1, 1, 8).expand(1, 1, 2, 8).clone(), c, s)[0, 0, 1]
        return (rq * rk).sum()
    assert torch.allclose(dot(3, 1), dot(10, 8), atol=1e-5)


def test_rope_frequencies_stay_float32_when_the_model_is_cast():
    rope = RotaryEmbedding(64, theta=500000.0).to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.float32
    assert torch.equal(rope.inv_freq, rope_inverse_frequencies(64, 500000.0))
    cos, _ = rope(torch.tensor([[4000]]), dtype=torch.bfloat16)
    assert cos.dtype == torch.bfloat16


def test_rope_scaling_variants():
    base = rope_inverse_frequencies(16, 10000.0)
    assert torch.allclose(rope_inverse_frequencies(16, 10000.0, {"rope_type": "linear", "factor": 4.0}), base / 4)
    llama3 = rope_inverse_frequencies(16, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    assert llama3[0] == base[0] and torch.isclose(llama3[-1], base[-1] / 8)  # high freq kept, low freq scaled
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        rope_inverse_frequencies(16, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_slot_mask_rules():
    slots = torch.arange(5)
    causal = slot_mask(slots, slots)[0, 0]
    assert torch.equal(causal, torch.ones(5, 5, dtype=torch.bool).tril())
    window = slot_mask(slots, slots, window=2)[0, 0]
    assert torch.equal(window, torch.ones(5, 5, dtype=torch.bool).tril() & ~torch.ones(5, 5, dtype=torch.bool).tril(-2))
    padded = slot_mask(slots, slots, attention_mask=torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    assert padded[4].tolist() == [False, False, True, True, True]
    assert padded[0].tolist() == [True, False, False, False, False]  # a pad query sees itself only
    empty = slot_mask(torch.tensor([3]), torch.tensor([2, -1, 3]))[0, 0]
    assert empty.tolist() == [[True, False, True]]


def reference_attention(attn: CausalSelfAttention, x, window=None):
    """Eager attention with explicitly repeated kv heads."""
    B, T, _ = x.shape
    H, Hkv, Dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q, k, v = attn.qkv(x).split([H * Dh, Hkv * Dh, Hkv * Dh], dim=-1)
    q = q.view(B, T, H, Dh).transpose(1, 2)
    k = k.view(B, T, Hkv, Dh).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    v = v.view(B, T, Hkv, Dh).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Dh)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    allowed = (j <= i) & ((j > i - window) if window else True)
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.out(y.transpose(1, 2).reshape(B, T, H * Dh))


@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (1, None), (2, 3)])
def test_attention_matches_eager_reference(kv_heads, window):
    attn = CausalSelfAttention(32, 4, kv_heads, sliding_window=window)
    x = torch.randn(2, 9, 32)
    assert torch.allclose(attn(x), reference_attention(attn, x, window), atol=1e-5)


@pytest.mark.parametrize("window,chunks", [(None, [5, 1, 1, 3, 1]), (3, [5, 1, 1, 3, 1]), (4, [1] * 10), (2, [7, 3])])
def test_kv_cache_in_chunks_equals_full_forward(window, chunks):
    attn = CausalSelfAttention(32, 4, 2, sliding_window=window)
    x = torch.randn(2, sum(chunks), 32)
    full = attn(x)
    attn.setup_kv_cache(2, sum(chunks))
    outs, start = [], 0
    for n in chunks:
        outs.append(attn(x[:, start:start + n]))
        start += n
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)
    if window is not None:  # rolling buffer: memory bounded by the window, not the sequence
        assert attn.kv_cache.k.shape[2] == window


def test_kv_cache_stores_only_kv_heads_and_refuses_overflow():
    cache = KVCache(2, num_kv_heads=1, head_dim=8, max_length=4)
    assert cache.k.shape == (2, 1, 4, 8)
    cache.update(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8))
    with pytest.raises(ValueError, match="KV cache holds 4 slots; 3 used, 2 more asked"):
        cache.update(torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8))


def test_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="embed_dim=30 is not divisible by num_heads=4"):
        CausalSelfAttention(30, 4)
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        CausalSelfAttention(32, 4, 3)


def test_mlp_variants():
    x = torch.randn(2, 3, 8)
    mlp = MLP(8, 16, activation="gelu_tanh")
    assert torch.allclose(mlp(x), mlp.down(F.gelu(mlp.up(x), approximate="tanh")))
    swiglu = SwiGLU(8, 16)
    gate, up = swiglu.gate_up.weight[:16], swiglu.gate_up.weight[16:]
    assert torch.allclose(swiglu(x), swiglu.down(F.silu(x @ gate.T) * (x @ up.T)), atol=1e-6)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MLP(8, 16, activation="swish")


def moe_reference(moe: MoE, x):
    """Token by token: softmax router, top-k, renormalised weights, SwiGLU experts."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    probs = moe.router(flat).softmax(-1)
    for n in range(flat.shape[0]):
        weights, experts = probs[n].topk(moe.experts_per_token)
        for w, e in zip(weights / weights.sum(), experts):
            gate, up = (moe.gate_up[e] @ flat[n]).chunk(2)
            out[n] += w * (moe.down[e] @ (F.silu(gate) * up))
    return out.view(x.shape)


def test_moe_matches_token_by_token_reference_and_trains():
    moe = MoE(16, 24, num_experts=4, experts_per_token=2)
    x = torch.randn(3, 7, 16, requires_grad=True)
    out, aux = moe(x)
    assert torch.allclose(out, moe_reference(moe, x), atol=1e-6)
    (out.square().sum() + aux).backward()
    assert x.grad is not None and moe.gate_up.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0


def test_load_balancing_loss_is_k_when_uniform_and_grows_when_skewed():
    n, e, k = 8, 4, 2
    uniform = load_balancing_loss(torch.full((n, e), 1 / e), torch.full((e,), n * k // e))
    assert uniform.item() == pytest.approx(k)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(n, e)
    skewed = load_balancing_loss(skewed_probs, torch.tensor([n, n, 0, 0]))
    assert skewed.item() > uniform.item()


def test_moe_rejects_bad_config():
    with pytest.raises(ValueError, match="experts_per_token=3 must be between 1 and num_experts=2"):
        MoE(16, 16, num_experts=2, experts_per_token=3)
    with pytest.raises(ValueError, match="divisible by 8"):
        MoE(12, 16)


@pytest.mark.parametrize("vocab,chunk", [(97, 2**10), (5000, 2**14), (5000, 2**30)])
def test_linear_cross_entropy_matches_unfused(vocab, chunk, monkeypatch):
    from llmzoo.layers import loss

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", chunk)  # several chunks, a ragged last one, or one chunk
    hidden = torch.randn(300, 16, requires_grad=True)
    weight = torch.randn(vocab, 16, requires_grad=True)
    targets = torch.randint(0, vocab, (300,))
    targets[::7] = -100
    fused = loss.linear_cross_entropy(hidden, weight, targets)
    (2.5 * fused).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    (2.5 * reference).backward()
    assert torch.allclose(fused, reference, atol=1e-5)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6) and torch.allclose(grads[1], weight.grad, atol=1e-6)
    with torch.no_grad():
        total = loss.linear_cross_entropy(hidden, weight, targets, reduction="sum")
    assert torch.allclose(total, F.cross_entropy(hidden @ weight.T, targets, reduction="sum"), rtol=1e-5)


def test_linear_cross_entropy_with_bf16_weights_sums_the_weight_gradient_in_float32(monkeypatch):
    """bf16-true: hidden states and weights in bf16. Over 64 chunks of rows the gradients stay within one bf16
    rounding of the float32 ones computed from the same values (summing the weight gradient in bf16 was 4x off)."""
    from llmzoo.layers import loss

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 64 * 512)
    hidden = torch.randn(4096, 64).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(512, 64) * 0.05).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 512, (4096,))
    fused = loss.linear_cross_entropy(hidden, weight, targets)
    fused.backward()
    exact_hidden, exact_weight = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    reference = F.cross_entropy(exact_hidden @ exact_weight.T, targets)
    reference.backward()
    assert fused.dtype == torch.float32 and fused.item() == pytest.approx(reference.item(), rel=1e-5)
    for grad, exact in ((hidden.grad, exact_hidden.grad), (weight.grad, exact_weight.grad)):
        assert grad.dtype == torch.bfloat16 and (grad.float() - exact).norm() / exact.norm() < 2**-8


def test_linear_cross_entropy_under_bf16_autocast():
    from llmzoo.layers.loss import linear_cross_entropy

    hidden = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(50, 32, requires_grad=True)
    targets = torch.randint(0, 50, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets)
        expected = F.cross_entropy(F.linear(hidden, weight).float(), targets)  # an nn.Linear head under autocast
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # the projection ran in bf16: the gradients are those of the bf16-rounded operands, within bf16 rounding
    rounded_hidden = hidden.detach().bfloat16().float().requires_grad_()
    rounded_weight = weight.detach().bfloat16().float().requires_grad_()
    F.cross_entropy(rounded_hidden @ rounded_weight.T, targets).backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32
    for grad, exact in ((hidden.grad, rounded_hidden.grad), (weight.grad, rounded_weight.grad)):
        assert (grad - exact).norm() / exact.norm() < 2**-7
