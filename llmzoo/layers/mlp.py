"""Feed-forward layers: the two-layer MLP (GELU / ReLU), SwiGLU, and the sparse mixture of experts."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmzoo.layers.init import init_linear

ACTIVATIONS = {
    "gelu": F.gelu,  # exact, erf-based
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # GPT-1/GPT-2's "gelu_new"
    "relu": F.relu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """``down(act(up(x)))``: ``[.., D] -> [.., ffn_dim] -> [.., D]``."""

    def __init__(self, embed_dim: int, ffn_dim: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: use one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.up = nn.Linear(embed_dim, ffn_dim, bias=bias)
        self.down = nn.Linear(ffn_dim, embed_dim, bias=bias)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Normal(0, std) ``up``, Normal(0, residual_std) ``down`` (it writes into the residual stream), zero biases."""
        init_linear(self.up, std)
        init_linear(self.down, residual_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(ACTIVATIONS[self.activation](self.up(x)))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020), gate and up fused in one projection ``gate_up``."""

    def __init__(self, embed_dim: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.gate_up = nn.Linear(embed_dim, 2 * ffn_dim, bias=bias)
        self.down = nn.Linear(ffn_dim, embed_dim, bias=bias)

    def init_weights(self, std: float, residual_std: float) -> None:
        """Normal(0, std) ``gate_up``, Normal(0, residual_std) ``down`` (it writes into the residual stream)."""
        init_linear(self.gate_up, std)
        init_linear(self.down, residual_std)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def load_balancing_loss(router_probs: Tensor, expert_counts: Tensor) -> Tensor:
    """Switch / Mixtral auxiliary loss ``E * sum_e f_e * P_e``: ``f_e`` = top-k assignments to expert
    e per token, ``P_e`` = mean router probability of e. Equals ``k`` when routing is uniform."""
    num_tokens, num_experts = router_probs.shape
    return num_experts * torch.sum(expert_counts.to(router_probs.dtype) / num_tokens * router_probs.mean(0))


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts with top-k routing (Mixtral).

    The router's softmax over all experts picks ``experts_per_token`` experts per token and their
    weights are renormalised to sum to 1. Tokens are sorted by expert and every expert runs in one
    grouped matmul (``torch.nn.functional.grouped_mm``): no Python loop over tokens or experts.
    Expert weights are stacked: ``gate_up [E, 2F, D]`` (gate rows first), ``down [E, D, F]``.

    ``forward`` returns ``(output [B, T, D], load_balancing_loss [])``.
    """

    def __init__(self, embed_dim: int, ffn_dim: int, num_experts: int = 8, experts_per_token: int = 2):
        super().__init__()
        if not 1 <= experts_per_token <= num_experts:
            raise ValueError(f"experts_per_token={experts_per_token} must be between 1 and "
                             f"num_experts={num_experts}: lower experts_per_token or add experts")
        if embed_dim % 8 or ffn_dim % 8:
            raise ValueError(f"MoE needs embed_dim and ffn_dim divisible by 8 for its grouped matmul, got "
                             f"{embed_dim} and {ffn_dim}: round them to a multiple of 8")
        self.num_experts, self.experts_per_token = num_experts, experts_per_token
        self.router = nn.Linear(embed_dim, num_experts, bias=False)
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * ffn_dim, embed_dim))
        self.down = nn.Parameter(torch.empty(num_experts, embed_dim, ffn_dim))
        self.adapters = nn.ModuleDict()  # name of an expert weight -> (rows [N, in], offsets) -> update [N, out] (LoRA)
        self.init_weights(std=0.02, residual_std=0.02)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        """Normal(0, std) router and ``gate_up``, Normal(0, residual_std) ``down`` (it writes into the residual
        stream)."""
        init_linear(self.router, std)
        nn.init.normal_(self.gate_up, std=std)
        nn.init.normal_(self.down, std=residual_std)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape, k = x.shape, self.experts_per_token
        x = x.reshape(-1, shape[-1])                                     # [N, D]
        probs = self.router(x).float().softmax(dim=-1)                   # [N, E]
        weights, experts = probs.topk(k, dim=-1)                         # [N, k]
        weights = weights / weights.sum(dim=-1, keepdim=True)
        if torch.compiler.is_exporting():  # ONNX has no grouped matmul
            return self.dense(x, probs, weights, experts, shape)

        # sort the N*k (token, expert) assignments by expert; each expert owns a contiguous run
        order = experts.flatten().argsort(stable=True)
        token = order // k
        counts = torch.bincount(experts.flatten(), minlength=self.num_experts)
        offsets = counts.cumsum(0).to(torch.int32)

        gate, up = self.expert_matmul("gate_up", x.index_select(0, token), offsets).chunk(2, dim=-1)
        y = self.expert_matmul("down", F.silu(gate) * up, offsets)  # [N*k, D]
        y = y * weights.flatten()[order, None].to(y.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y)
        return out.view(shape), load_balancing_loss(probs, counts)

    def dense(self, x: Tensor, probs: Tensor, weights: Tensor, experts: Tensor,
              shape: torch.Size) -> tuple[Tensor, Tensor]:
        """:meth:`forward` for graph exporters: every expert on every token ``x [N, D]``, weighted by the routing
        (zero but for the ``k`` chosen experts): the same output, ``num_experts / k`` times the work."""
        route = torch.zeros_like(probs).scatter(1, experts, weights)  # [N, E]
        gate, up = torch.einsum("nd,efd->nef", x, self.expert_weight("gate_up", x.dtype)).chunk(2, dim=-1)
        y = torch.einsum("nef,edf->ned", F.silu(gate) * up, self.expert_weight("down", x.dtype))
        out = torch.einsum("ned,ne->nd", y, route.to(y.dtype))
        return out.view(shape), load_balancing_loss(probs, (route > 0).sum(0))

    @torch.compiler.disable  # grouped_mm's meta function refuses float32 (a CUDA rule): a compiled step runs it as is
    def expert_matmul(self, name: str, x: Tensor, offsets: Tensor) -> Tensor:
        """Rows ``x [N*k, in]`` sorted by expert (``offsets``: where each expert's rows end) times their expert's
        weight ``name`` (``gate_up`` or ``down``), transposed: one grouped matmul, plus the adapter of that weight in
        :attr:`adapters` if any."""
        y = F.grouped_mm(x, self.expert_weight(name, x.dtype).transpose(1, 2), offs=offsets)
        return y + self.adapters[name](x, offsets) if name in self.adapters and self.adapters[name].enabled else y

    def expert_weight(self, name: str, dtype: torch.dtype) -> Tensor:
        """The stacked expert weight ``name`` ``[E, out, in]`` as a tensor: a quantized one (a module of
        :mod:`llmzoo.layers.quantized`, put there by :func:`llmzoo.quantize.quantize`) is dequantized to ``dtype``."""
        weight = getattr(self, name)
        return weight if isinstance(weight, Tensor) else weight.dequantize(dtype)

    def extra_repr(self) -> str:
        E, F2, D = self.gate_up.shape
        return f"embed_dim={D}, ffn_dim={F2 // 2}, num_experts={E}, experts_per_token={self.experts_per_token}"
