"""Weight-only quantization: weights held in int8 or int4, activations in floating point.

* **int8**: symmetric, one scale per output row: ``w = data * scale``.
* **int4**: asymmetric, one scale and zero per output row and group of ``group_size`` input columns:
  ``w = (q - 8) * scale + zero`` with ``q`` in 0..15 (the convention of torch's int4 kernels).

On a CPU the matrix products run in torch's packed weight-only kernels with bfloat16 activations
(``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``), which read 1 or 1/2 byte per weight
instead of 4; elsewhere (and for shapes those kernels refuse) the weight is dequantized to the activations'
dtype for the product. Scales and zeros are kept in the kernels' dtype, bfloat16.

:class:`QuantizedLinear` replaces an ``nn.Linear``; :class:`Int8Weight` and :class:`Int4Weight` hold any
``[..., N, K]`` weight (the stacked experts of :class:`~llmzoo.layers.MoE` too, which dequantizes them).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALE_DTYPE = torch.bfloat16  # the activations' dtype of the CPU kernels, and so of their scales
GROUP_SIZES = (32, 64, 128, 256)


class Int8Weight(nn.Module):
    """A weight ``[..., N, K]`` as ``data`` int8 ``[..., N, K]`` and ``scale [..., N]``: ``w = data * scale``."""

    def __init__(self, shape: tuple[int, ...], device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("data", torch.empty(shape, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(shape[:-1], dtype=SCALE_DTYPE, device=device))

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: Tensor) -> Int8Weight:
        """Round ``weight`` to 255 levels per row, symmetric about 0 (per-channel absmax)."""
        quantized = cls(tuple(weight.shape), weight.device)
        scale = (weight.float().abs().amax(-1) / 127).clamp(min=1e-10).to(SCALE_DTYPE)
        quantized.scale.copy_(scale)
        quantized.data.copy_((weight.float() / scale.float()[..., None]).round().clamp(-127, 127))
        return quantized

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.data.to(dtype) * self.scale.to(dtype)[..., None]

    dtype = property(lambda self: torch.float32, doc="the dtype it dequantizes to by default (a LoRA adapter's)")
    device = property(lambda self: self.data.device)

    def matmul(self, x: Tensor) -> Tensor | None:
        """``x [M, K] @ w.T`` in torch's CPU kernel (bfloat16 activations), or None where it does not apply."""
        if self.data.device.type != "cpu" or self.data.ndim != 2:
            return None
        return torch._weight_int8pack_mm(x.to(self.scale.dtype), self.data, self.scale)


class Int4Weight(nn.Module):
    """A weight ``[..., N, K]`` in 4 bits: ``w = (q - 8) * scale + zero`` per row and group of ``group_size`` columns.

    The state dict holds ``data`` uint8 ``[..., N, K / 2]`` (two columns a byte, the even one in the low nibble)
    and ``scales_and_zeros [..., K / group_size, N, 2]``. On a CPU a 2-D weight with ``N`` a multiple of 16 is held
    in torch's packed layout for ``_weight_int4pack_mm_for_cpu`` instead (``packed``); it is unpacked again to be
    saved or moved to another device, so checkpoints do not depend on the CPU that wrote them.
    """

    def __init__(self, shape: tuple[int, ...], group_size: int, device: torch.device | str | None = None):
        super().__init__()
        *batch, n, k = shape
        self.group_size, self.packed = group_size, False
        self.register_buffer("data", torch.empty(*batch, n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(*batch, k // group_size, n, 2, dtype=SCALE_DTYPE,
                                                             device=device))

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: Tensor, group_size: int) -> Int4Weight:
        """Round each group of ``group_size`` columns of ``weight`` to 16 levels between its minimum and maximum."""
        quantized = cls(tuple(weight.shape), group_size, weight.device)
        groups = weight.float().unflatten(-1, (-1, group_size))  # [..., N, K / g, g]
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=1e-10).to(SCALE_DTYPE)
        zero = (low + 8 * scale.float()).to(SCALE_DTYPE)
        q = ((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15).flatten(-2)
        quantized.data.copy_(pack_nibbles(q.to(torch.uint8)))
        quantized.scales_and_zeros.copy_(torch.stack([scale, zero], -1).transpose(-3, -2))
        quantized.pack()
        return quantized

    @property
    def shape(self) -> torch.Size:
        *batch, groups, n, _ = self.scales_and_zeros.shape
        return torch.Size([*batch, n, groups * self.group_size])

    dtype = property(lambda self: torch.float32, doc="the dtype it dequantizes to by default (a LoRA adapter's)")
    device = property(lambda self: self.data.device)

    def levels(self) -> Tensor:
        """``q`` uint8 ``[..., N, K]``, each in 0..15."""
        if self.packed:
            return unpack_cpu_int4(self.data, *self.shape)
        return unpack_nibbles(self.data)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        scale, zero = self.scales_and_zeros.to(dtype).transpose(-3, -2).unbind(-1)  # [..., N, K / g]
        q = self.levels().to(dtype).unflatten(-1, (-1, self.group_size))
        return ((q - 8) * scale[..., None] + zero[..., None]).flatten(-2)

    def matmul(self, x: Tensor) -> Tensor | None:
        """``x [M, K] @ w.T`` in torch's CPU kernel (bfloat16 activations), or None where it does not apply."""
        if not self.packed:
            return None
        sz = self.scales_and_zeros
        return torch._weight_int4pack_mm_for_cpu(x.to(sz.dtype), self.data, self.group_size, sz)

    @torch.no_grad()
    def pack(self) -> None:
        """Hold ``data`` in torch's CPU kernel layout, where that kernel applies."""
        n, k = self.shape[-2:]
        if not self.packed and self.data.device.type == "cpu" and self.data.ndim == 2 and n % 16 == 0:
            self.data = torch._convert_weight_to_int4pack_for_cpu(unpack_nibbles(self.data).int(), 1)
            self.packed = True

    def unpack(self) -> None:
        """Back to the portable layout of the state dict."""
        if self.packed:
            self.data = pack_nibbles(self.levels())
            self.packed = False

    def _apply(self, fn, recurse=True):
        self.unpack()  # torch's packed layout is for one CPU kernel: move the portable one, pack again there
        super()._apply(fn, recurse)
        self.pack()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "data"] = pack_nibbles(self.levels())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.data.is_meta:
            self.pack()


def pack_nibbles(q: Tensor) -> Tensor:
    """``q [..., K]`` of values 0..15 -> uint8 ``[..., K / 2]``, the even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[..., ::2] | (q[..., 1::2] << 4)


def unpack_nibbles(data: Tensor) -> Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``[..., K / 2]`` -> ``[..., K]``."""
    return torch.stack([data & 15, data >> 4], -1).flatten(-2)


def unpack_cpu_int4(packed: Tensor, n: int, k: int) -> Tensor:
    """``q`` uint8 ``[N, K]`` from torch's CPU int4 layout (see :func:`cpu_int4_sources`)."""
    q = torch.empty(n * k, dtype=torch.uint8)
    q[cpu_int4_sources(n, k)] = unpack_nibbles(packed).flatten()
    return q.view(n, k)


@functools.lru_cache(maxsize=16)
def cpu_int4_sources(n: int, k: int) -> Tensor:
    """For each nibble of torch's CPU int4 layout of an ``[N, K]`` weight, the flat index of the weight it holds.
    The tiling depends on the CPU's vector width, so it is read off the packing of the base-16 digits of every
    index; kept (int32, for the last 16 shapes) because LoRA on an int4 base dequantizes at every backward pass."""
    index = torch.arange(n * k)
    source = torch.zeros(n * k, dtype=torch.int32 if n * k < 2**31 else torch.long)
    for digit in range(max(1, math.ceil(math.log(n * k, 16)))):
        probe = torch._convert_weight_to_int4pack_for_cpu(((index >> 4 * digit) & 15).view(n, k).int(), 1)
        source |= unpack_nibbles(probe).flatten().to(source.dtype) << 4 * digit
    return source


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with a weight-only quantized ``weight`` (:class:`Int8Weight` or :class:`Int4Weight`) and a
    floating-point ``bias``: ``[..., in_features] -> [..., out_features]`` in the input's dtype."""

    def __init__(self, weight: Int8Weight | Int4Weight, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def quantize(cls, linear: nn.Linear, mode: str, group_size: int) -> QuantizedLinear:
        weight = (Int8Weight.quantize(linear.weight) if mode == "int8"
                  else Int4Weight.quantize(linear.weight, group_size))
        return cls(weight, linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if x.requires_grad:  # LoRA on a quantized base: the gradient reaches x through the dequantized weight
            y = QuantizedMatmul.apply(flat, self.weight)
        else:
            y = quantized_matmul(flat, self.weight)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        kind = "int8" if isinstance(self.weight, Int8Weight) else f"int4, group_size={self.weight.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}, bias={self.bias is not None}"


def quantized_matmul(x: Tensor, weight: Int8Weight | Int4Weight) -> Tensor:
    """``x [M, K] @ w.T`` in ``x``'s dtype for a quantized ``w``: its kernel where one applies, else the weight
    dequantized to ``x``'s dtype."""
    y = weight.matmul(x)
    return (F.linear(x, weight.dequantize(x.dtype)) if y is None else y).to(x.dtype)


class QuantizedMatmul(torch.autograd.Function):
    """:func:`quantized_matmul` whose gradient flows to ``x`` only, through the weight dequantized again in the
    backward pass (nothing float is kept between the two: LoRA on a quantized base, QLoRA-style)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Int8Weight | Int4Weight) -> Tensor:
        ctx.weight = weight
        return quantized_matmul(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.weight.dequantize(grad.dtype), None


def quantize_weight(weight: Tensor, mode: str, group_size: int) -> Int8Weight | Int4Weight:
    """``weight [..., N, K]`` in ``mode`` (``"int8"`` or ``"int4"``)."""
    return Int8Weight.quantize(weight) if mode == "int8" else Int4Weight.quantize(weight, group_size)


def empty_weight(shape: tuple[int, ...], mode: str, group_size: int, device=None) -> Int8Weight | Int4Weight:
    """An uninitialised quantized weight of ``shape``, to be filled from a state dict."""
    return Int8Weight(shape, device) if mode == "int8" else Int4Weight(shape, group_size, device)
