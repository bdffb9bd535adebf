"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners")."""

from __future__ import annotations

from llmzoo.models.gpt import GPT


class GPT2(GPT):
    """GPT-1 made pre-norm, which adds a final LayerNorm before the (tied) output head.
    Hugging Face twin: ``GPT2LMHeadModel``."""

    prenorm = True
