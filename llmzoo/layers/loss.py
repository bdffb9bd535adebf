"""Next-token cross-entropy fused with the output projection, in chunks of rows.

``cross_entropy(hidden @ weight.T, targets)`` materialises ``[N, vocab]`` logits, their log-softmax
and their gradient: with a 32k vocabulary and 8k tokens, 1 GiB apiece in fp32. Here the logits
exist one chunk of rows at a time, and the gradients of ``hidden`` and ``weight`` are computed in
the same pass (softmax minus the one-hot target is the gradient of the logits), as in
Liger-Kernel's fused linear cross-entropy.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**24  # logits per chunk on a CPU: 64 MiB in fp32 (smaller chunks re-add the head gradient too often)
ACCELERATOR_CHUNK_ELEMENTS = 2**26  # on a GPU: 256 MiB in fp32, so that a chunk's kernels are not launch-bound


def _row_chunks(num_rows: int, vocab_size: int, device: torch.device) -> list[slice]:
    step = max(1, (CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS) // vocab_size)
    return [slice(start, start + step) for start in range(0, num_rows, step)]


def _chunk_nll(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row NLL ``[n]`` of one chunk (0 where ignored) and its float32 log-probabilities ``[n, V]``."""
    log_probs = (hidden @ weight.t()).float().log_softmax(dim=-1)
    valid = targets != IGNORE_INDEX
    nll = -log_probs.gather(1, targets.clamp(min=0)[:, None]).squeeze(-1) * valid
    return nll, log_probs


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
        valid = targets != IGNORE_INDEX
        scale = (valid / valid.sum().clamp(min=1))[:, None]  # d(mean loss) / d(row loss)
        # 16-bit compute (bf16-mixed, bf16-true): each chunk's products are rounded once, the weight gradient's
        # sum over chunks is kept in float32
        low_precision = hidden.dtype in (torch.float16, torch.bfloat16)
        trained = weight.requires_grad  # a frozen head (LoRA) gets no weight gradient: no [V, D] buffer, no matmuls
        grad_hidden = torch.empty_like(hidden)
        grad_weight = None if not trained else (weight.new_zeros(weight.shape, dtype=torch.float32) if low_precision
                                                else torch.empty_like(weight))
        compute_weight = weight.to(hidden.dtype)  # a bf16 copy under mixed precision, else weight itself
        chunks = _row_chunks(hidden.shape[0], weight.shape[0], hidden.device)
        # one buffer for every chunk's logits and one for its log-probs: fresh large allocations
        # cost page faults on every step on CPU
        rows = chunks[0].stop - chunks[0].start
        logits_buffer = hidden.new_empty(rows, weight.shape[0])
        probs_buffer = hidden.new_empty(rows, weight.shape[0], dtype=torch.float32)
        total = hidden.new_zeros((), dtype=torch.float32)
        for i, chunk in enumerate(chunks):
            h, t = hidden[chunk], targets[chunk]
            logits = torch.mm(h, compute_weight.t(), out=logits_buffer[: h.shape[0]])
            probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=probs_buffer[: h.shape[0]])
            index = t.clamp(min=0)[:, None]
            total -= (probs.gather(1, index).squeeze(-1) * valid[chunk]).sum()
            probs.exp_().scatter_add_(1, index, torch.full_like(index, -1, dtype=probs.dtype))  # softmax - onehot
            grad_logits = probs.mul_(scale[chunk]).to(hidden.dtype)
            torch.mm(grad_logits, compute_weight, out=grad_hidden[chunk])
            if not trained:
                continue
            if low_precision:
                grad_weight += grad_logits.t() @ h
            else:
                grad_weight.addmm_(grad_logits.t(), h, beta=int(i > 0))
        ctx.grads = grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)
        return total / valid.sum().clamp(min=1)

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's gradients were already used: it supports one backward pass")
        (grad_hidden, grad_weight), ctx.grads = ctx.grads, None
        # scaled in place: the gradients were computed for this backward pass alone
        grad_weight = None if grad_weight is None else grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of ``hidden [N, D] @ weight [V, D].T`` against ``targets [N]`` (-100 = ignore).

    ``reduction``: ``"mean"`` over non-ignored rows or ``"sum"``. With gradients enabled, the mean
    is computed with its gradient in one pass; the sum is for evaluation only. Under autocast the
    projection runs in the autocast dtype, as an ``nn.Linear`` head would; the softmax is float32 always.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        hidden = hidden.to(torch.get_autocast_dtype(hidden.device.type))
    if reduction == "mean" and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets)
    total = sum(_chunk_nll(hidden[rows], weight, targets[rows])[0].sum()
                for rows in _row_chunks(hidden.shape[0], weight.shape[0], hidden.device))
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
