"""RoPE settings of the Llama family both ways: transformers 5's ``rope_parameters`` (and the legacy
``rope_theta`` / ``rope_scaling`` keys of transformers 4) <-> llmzoo's ``rope_theta`` and ``rope_scaling``."""

from __future__ import annotations

ROPE_KEYS = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_scaling(params: dict, max_position_embeddings: int) -> dict | None:
    """``rope_scaling`` in llmzoo's form (``{"rope_type": ..., <its float / int fields>}``, None for plain
    RoPE) from a Hugging Face rope dict; refuses the kinds llmzoo does not implement."""
    params = dict(params)
    params.pop("rope_theta", None)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if kind == "default":
        return None
    if kind not in ROPE_KEYS:
        raise ValueError(f"rope_type {kind!r} is not supported: llmzoo implements 'default', "
                         f"{', '.join(repr(k) for k in ROPE_KEYS)}")
    if float(params.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported: llmzoo rotates every head dimension")
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", max_position_embeddings)
    extra = sorted(set(params) - set(ROPE_KEYS[kind]))
    if extra:
        raise ValueError(f"rope parameters {extra} of rope_type {kind!r} are not supported")
    return {"rope_type": kind, **{key: int(params[key]) if key == "original_max_position_embeddings"
                                  else float(params[key]) for key in ROPE_KEYS[kind]}}


def rope_from_hf(config: dict) -> dict:
    """llmzoo's ``rope_theta`` and ``rope_scaling`` of a config.json (as transformers: ``rope_scaling`` wins
    over ``rope_parameters``; the top-level ``rope_theta`` is the fallback)."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return dict(rope_theta=float(rope.get("rope_theta") or config["rope_theta"]),
                rope_scaling=rope_scaling(rope, config["max_position_embeddings"]))


def rope_to_hf(hparams) -> dict:
    """config.json's ``rope_parameters``, and the legacy keys for tools on transformers 4.x
    (``rope_parameters`` wins in transformers 5)."""
    scaling = rope_scaling(hparams.rope_scaling or {}, hparams.max_position_embeddings)
    theta = float(hparams.rope_theta)
    return dict(rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": theta},
                rope_theta=theta, rope_scaling=scaling)
