"""The allowed range of every numeric hyperparameter of the zoo's models, checked at construction so that a bad
value fails at once with a message naming the setting, its range and the flag, not later as a division by zero
or a torch error."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

# name -> (test, the range in words); a value of None is always allowed (it means "the default rule")
RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    **{name: (lambda v: v >= 1, ">= 1") for name in (
        "vocab_size", "embed_dim", "num_heads", "num_layers", "max_position_embeddings", "num_kv_heads", "head_dim",
        "ffn_dim", "sliding_window", "num_experts", "experts_per_token", "lr_decay_steps")},
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "learning_rate": (lambda v: 0 < v < math.inf, "> 0"),
    "min_learning_rate": (lambda v: 0 <= v < math.inf, ">= 0"),
    "weight_decay": (lambda v: 0 <= v < math.inf, ">= 0"),
    "aux_loss_coef": (lambda v: 0 <= v < math.inf, ">= 0"),
    "norm_eps": (lambda v: 0 < v < 1, "in (0, 1)"),
    "rope_theta": (lambda v: 1 < v < math.inf, "> 1"),
}


def check_hyperparameters(hparams: Mapping) -> None:
    """Raise a one-line ``ValueError`` for the first numeric hyperparameter out of its range (see :data:`RANGES`),
    for ``betas`` outside [0, 1) and for a ``min_learning_rate`` above ``learning_rate``."""
    for name, value in hparams.items():
        if name in RANGES and value is not None:
            test, allowed = RANGES[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
                raise ValueError(f"{name}={value!r} is out of range: it must be {allowed} (set --model.{name})")
    betas = hparams.get("betas")
    if betas is not None and (len(betas) != 2 or not all(0 <= b < 1 for b in betas)):
        raise ValueError(f"betas={list(betas)} is out of range: two numbers in [0, 1), such as [0.9, 0.95] "
                         f"(set --model.betas)")
    low, peak = hparams.get("min_learning_rate"), hparams.get("learning_rate")
    if low is not None and peak is not None and low > peak:
        raise ValueError(f"min_learning_rate={low} is above learning_rate={peak}: the cosine decays to it "
                         f"(set --model.min_learning_rate to at most --model.learning_rate)")
