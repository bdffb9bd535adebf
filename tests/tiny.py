"""Tiny configurations of every architecture, shared by the tests."""

TINY = dict(vocab_size=97, embed_dim=32, num_heads=4, num_layers=2, max_position_embeddings=64, dropout=0.0)

TINY_CONFIGS = {
    "GPT": TINY,
    "GPT2": TINY,
    "Transformer": TINY,
    "Llama": dict(TINY, num_kv_heads=2, ffn_dim=48),
    "Mistral": dict(TINY, num_kv_heads=2, ffn_dim=48, sliding_window=8),
    "Mixtral": dict(TINY, num_kv_heads=2, ffn_dim=48, num_experts=4, experts_per_token=2, sliding_window=8),
    "Qwen2": dict(TINY, num_kv_heads=2, ffn_dim=48, tie_word_embeddings=True),
    "Qwen3": dict(TINY, num_kv_heads=2, ffn_dim=48, head_dim=16),
}


def tiny_model(name: str, **overrides):
    from llmzoo import ARCHITECTURES

    return ARCHITECTURES[name](**{**TINY_CONFIGS[name], **overrides})
