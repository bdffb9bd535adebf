"""Preference tuning objectives: DPO (Rafailov et al., 2023; with label smoothing, conservative DPO), IPO (Azar et
al., 2023) and the reference-free SimPO (Meng et al., 2024), as pure tensor functions.

A batch of ``B`` pairs goes through the model as one batch of ``2B`` rows: the ``B`` chosen completions, then the
``B`` rejected ones, each after its pair's prompt. :func:`completion_logps` sums the log-probabilities of each row's
completion tokens; :func:`preference_loss` turns the sums of the policy (and of the reference) into the loss of each
pair and the implicit rewards.

    logps, tokens = completion_logps(hidden [2B, T, D], head_weight [V, D], targets [2B, T])   # [2B], [2B]
    losses, chosen_rewards, rejected_rewards = preference_loss(logps.view(2, B), reference [2, B] | None,
                                                               tokens.view(2, B), PreferenceSettings())  # [B] each

With ``x = (pi_c - ref_c) - (pi_r - ref_r)`` (sums of log-probabilities over a completion's tokens, ``n_c`` and
``n_r`` tokens):

- ``dpo``: ``-(1 - eps) log sigmoid(beta x) - eps log sigmoid(-beta x)`` (``eps`` = ``label_smoothing``: the share of
  pairs assumed flipped, conservative DPO); rewards ``beta (pi - ref)``;
- ``ipo``: ``((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2`` (the log-ratios per token, as TRL and the
  IPO authors normalise them); rewards ``beta (pi - ref)``;
- ``simpo``: ``-(1 - eps) log sigmoid(m) - eps log sigmoid(-m)`` with ``m = beta (pi_c / n_c - pi_r / n_r) - gamma``:
  no reference; rewards ``beta pi / n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
LOSS_TYPES = ("dpo", "ipo", "simpo")
REFERENCES = ("precomputed", "model")


@dataclass
class PreferenceSettings:
    """Preference tuning (the ``preference`` section of the model settings: ``--model.preference.beta 0.1``).

    Args:
        loss_type: ``dpo`` (sigmoid), ``ipo`` (squared) or ``simpo`` (length-normalised, reference-free).
        beta: the strength of the reference (dpo, ipo: the KL penalty's inverse temperature; simpo: the reward
            scale); positive.
        label_smoothing: dpo and simpo: the share of pairs taken as mislabelled (conservative DPO), in [0, 0.5).
        gamma: simpo: the target reward margin between chosen and rejected; 0 or more.
        reference: where the reference log-probabilities come from (dpo, ipo). ``precomputed``: the starting model,
            in one pass over the training and validation pairs before training, kept with the data (and in the
            checkpoints); ``model``: at every step, from the same weights with the LoRA adapters switched off, or
            without LoRA from a frozen copy of the starting weights (``--model.pretrained``).
    """

    loss_type: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    reference: str = "precomputed"


def check_settings(settings: PreferenceSettings) -> PreferenceSettings:
    """``settings``, or a one-line ``ValueError`` saying what is wrong and the fix."""
    if settings.loss_type not in LOSS_TYPES:
        raise ValueError(f"--model.preference.loss_type={settings.loss_type!r} is not a preference loss: use one of "
                         f"{', '.join(LOSS_TYPES)}")
    if isinstance(settings.beta, bool) or not isinstance(settings.beta, (int, float)) or not settings.beta > 0:
        raise ValueError(f"--model.preference.beta={settings.beta!r} must be positive: use 0.1 (smaller: further from "
                         f"the reference)")
    if not 0.0 <= settings.label_smoothing < 0.5:
        raise ValueError(f"--model.preference.label_smoothing={settings.label_smoothing!r} must be in [0, 0.5): the "
                         f"share of pairs taken as flipped (0: plain DPO)")
    if not settings.gamma >= 0:
        raise ValueError(f"--model.preference.gamma={settings.gamma!r} must be 0 or more (SimPO's target margin)")
    if settings.reference not in REFERENCES:
        raise ValueError(f"--model.preference.reference={settings.reference!r}: use one of {', '.join(REFERENCES)}")
    return settings


def completion_logps(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The summed log-probabilities of each row's completion tokens ``[N]`` and their number ``[N]`` (float32).

    ``hidden [N, T, D]``: the final hidden states; ``weight [V, D]``: the output head's; ``targets [N, T]``: the next
    tokens, -100 on the prompt and the padding. Only the completion positions are projected to the vocabulary
    (``[M, V]`` logits for the ``M`` completion tokens, not ``[N * T, V]``); the log-softmax is float32."""
    rows, positions = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)
    selected = hidden[rows, positions]  # [M, D]
    logits = (selected @ weight.t().to(selected.dtype)).float()
    token_logps = logits.log_softmax(-1).gather(1, targets[rows, positions][:, None]).squeeze(1)  # [M]
    sums = token_logps.new_zeros(targets.shape[0]).index_add(0, rows, token_logps)
    counts = torch.bincount(rows, minlength=targets.shape[0]).to(sums.dtype)
    return sums, counts


def preference_loss(policy: Tensor, reference: Tensor | None, tokens: Tensor,
                    settings: PreferenceSettings) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair loss ``[B]``, chosen and rejected rewards ``[B]`` (detached).

    ``policy [2, B]``: the summed completion log-probabilities of the model (row 0 chosen, row 1 rejected);
    ``reference [2, B]``: the same of the reference (unused by ``simpo``, which may pass None); ``tokens [2, B]``: the
    completions' token counts."""
    beta, smoothing = settings.beta, settings.label_smoothing
    if settings.loss_type == "simpo":
        average = policy / tokens
        margin = beta * (average[0] - average[1]) - settings.gamma
        losses = -(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)
        rewards = beta * average.detach()
        return losses, rewards[0], rewards[1]
    if reference is None:
        raise ValueError(f"loss_type={settings.loss_type!r} needs the reference log-probabilities")
    ratios = policy - reference  # [2, B]
    if settings.loss_type == "dpo":
        x = beta * (ratios[0] - ratios[1])
        losses = -(1 - smoothing) * F.logsigmoid(x) - smoothing * F.logsigmoid(-x)
    else:  # ipo
        per_token = ratios / tokens
        losses = (per_token[0] - per_token[1] - 1 / (2 * beta)) ** 2
    rewards = beta * ratios.detach()
    return losses, rewards[0], rewards[1]


def preference_metrics(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
                       policy: Tensor) -> dict[str, Tensor]:
    """The batch means practitioners read (TRL's names): ``loss``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies`` (the share of pairs whose chosen reward is the higher),
    ``logps/chosen``, ``logps/rejected`` (summed over the completion)."""
    policy = policy.detach()
    return {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy[0].mean(), "logps/rejected": policy[1].mean()}
