"""Exact token-level loss and perplexity, summed over batches and ranks.

torchmetrics' ``Perplexity`` materialises a full softmax and overflows on large logit gaps; these
metrics take the summed negative log-likelihood and the token count the loss already computed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class TokenNLL(Metric):
    """Mean negative log-likelihood per token (nats)."""

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _apply(self, fn, *args, **kwargs):
        # torchmetrics converts the states on module.to(dtype), as Lightning's bf16-true does: keep float64 sums
        this = super()._apply(fn, *args, **kwargs)
        this.nll, this._defaults["nll"] = this.nll.double(), this._defaults["nll"].double()
        return this

    def update(self, nll_sum: Tensor, count: Tensor) -> None:
        self.nll += nll_sum.detach().double()
        self.count += count.detach()

    def compute(self) -> Tensor:
        return (self.nll / self.count).float()


class TokenPerplexity(TokenNLL):
    """``exp`` of the mean token negative log-likelihood."""

    def compute(self) -> Tensor:
        return (self.nll / self.count).exp().float()


class BitsPerByte(TokenNLL):
    """Bits per byte: summed negative log-likelihood (nats) / ln 2 / the UTF-8 bytes of the text the targets spell
    (``update(nll_sum, num_bytes)``). It does not depend on the tokenizer: models with different tokenizers
    compare on it, where per-token loss and perplexity do not."""

    def compute(self) -> Tensor:
        return (self.nll / self.count / math.log(2)).float()
