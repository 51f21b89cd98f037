"""The model's layers as MLX's CPU backend runs them fastest.

Each class here is a model class with one or two seams overridden (`attend`, `qkv`, `gate_up`,
`activation`, a one-row `__call__`), built from a loaded layer by `swap_class`: the parameters,
children and their names stay as they were, so weights, `parameters()` and saved files see the
same model. `cpu.prepare` installs them with `update_modules`, the way mlx-lm installs LoRA layers.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..lora import LoRALinear
from ..models import lfm2, siglip2
from . import ops


def swap_class(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A `cls` with `module`'s parameters, children and attributes (a `cls` is a subclass of
    `type(module)` that adds no state of its own in `__init__`)."""
    swapped = cls.__new__(cls)
    dict.update(swapped, module)  # parameters and child modules, under their names
    swapped.__dict__.update(module.__dict__)  # plain attributes (head counts, the RoPE, ...)
    return swapped


def output_width(layer: nn.Module) -> int:
    """The output width of a linear layer, float or quantized, or of the one LoRA wraps."""
    return (layer.linear if isinstance(layer, LoRALinear) else layer).weight.shape[0]


class CpuLinear(nn.Linear):
    """nn.Linear through `ops.project`: one row as a matvec, bf16 weights kept under float32
    compute multiplied by the forwarder."""

    def __call__(self, x: mx.array) -> mx.array:
        out = ops.project(self.weight, x)
        return out + self["bias"] if "bias" in self else out

    def in_one_op(self, activations: mx.Dtype) -> bool:
        """Whether a one-row product is a single op (no split over the lanes), so it can run
        inside a compiled function."""
        weight = self.weight
        return weight.dtype == mx.float32 or ops.reads_bf16_weights(weight, activations)

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        quantized = super().to_quantized(group_size, bits, mode, quantize_input)
        if type(quantized) is nn.QuantizedLinear:
            return swap_class(quantized, CpuQuantizedLinear)
        return quantized


class CpuQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear; a one-row input is split over the lanes (`ops.quantized_matvec`)."""

    def __call__(self, x: mx.array) -> mx.array:
        if x.size != x.shape[-1]:
            return super().__call__(x)
        out = ops.quantized_matvec(self, x)
        return out + self["bias"] if "bias" in self else out


class CpuEmbedding(nn.Embedding):
    """nn.Embedding whose table may be kept bf16 under float32 compute (`cpu.kept_bf16_weights`):
    rows come out in the compute dtype, and the tied head reads the table through `ops.project`."""

    compute_dtype: mx.Dtype | None = None  # set by `cpu.prepare`

    def __call__(self, ids: mx.array) -> mx.array:
        rows = super().__call__(ids)
        return rows if self.compute_dtype is None else rows.astype(self.compute_dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        return ops.project(self.weight, x)

    def to_quantized(self, group_size=None, bits=None, mode="affine"):
        quantized = super().to_quantized(group_size, bits, mode)
        return swap_class(quantized, CpuQuantizedEmbedding)


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding; the tied head on one row is split over the lanes."""

    def as_linear(self, x: mx.array) -> mx.array:
        if x.size == x.shape[-1]:  # a decode step, or a prompt's last position
            return ops.quantized_matvec(self, x)
        return super().as_linear(x)


class StackedRows:
    """Float layers that read the same input, their weights stacked in one array.

    A decode step is bound by reading weights, and each BLAS call also pays a thread hand-off:
    one product over the stacked rows reads the same bytes in one call (w1 and w3 of a
    feed-forward, q/k/v of an attention: 450M float32 decode 2-8% faster). Each layer's weight
    becomes a row range of the stack, a view, so the layers and their parameter names stay as
    they were and nothing is stored twice.
    """

    def __init__(self, *layers: CpuLinear):
        self.stacked = mx.concatenate([layer.weight for layer in layers])
        mx.eval(self.stacked)
        self.splits, start = [], 0
        for layer in layers:
            rows = layer.weight.shape[0]
            layer.weight = self.stacked[start : start + rows]
            start += rows
            self.splits.append(start)
        self.views = [layer.weight for layer in layers]

    @staticmethod
    def of(*layers: nn.Module) -> StackedRows | None:
        """The stack of `layers`, or None unless all are bias-free `CpuLinear` layers."""
        if all(type(layer) is CpuLinear and "bias" not in layer for layer in layers):
            return StackedRows(*layers)
        return None

    def is_current(self, *layers: nn.Module) -> bool:
        """Whether `layers` (the owner's layers now) still hold the stack's views: False once
        a layer or its weight has been replaced (quantized, cast, reloaded)."""
        return all(
            layer.get("weight") is view for layer, view in zip(layers, self.views, strict=True)
        )

    def __call__(self, x: mx.array) -> list[mx.array]:
        """Each layer's output for x."""
        return mx.split(ops.project(self.stacked, x), self.splits[:-1], axis=-1)


class CpuAttention(lfm2.Attention):
    """q/k/v read as one stacked matrix; attention split over the lanes (`ops.attention`)."""

    stack: StackedRows | None = None  # set by `stack_projections`

    def stack_projections(self) -> None:
        self.stack = StackedRows.of(self.q_proj, self.k_proj, self.v_proj)

    def current_stack(self) -> StackedRows | None:
        if self.stack is not None and not self.stack.is_current(
            self.q_proj, self.k_proj, self.v_proj
        ):
            self.stack = None  # weights replaced since stacking: run unstacked, free the stack
        return self.stack

    def qkv(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        stack = self.current_stack()
        return tuple(stack(x)) if stack is not None else super().qkv(x)

    def attend(
        self, q: mx.array, k: mx.array, v: mx.array, mask: str | mx.array | None
    ) -> mx.array:
        if isinstance(mask, mx.array):  # rows of a batch: MLX's attention with their mask
            return super().attend(q, k, v, mask)
        return ops.attention(q, k, v, self.scale, causal=mask == "causal")


class CpuFeedForward(lfm2.FeedForward):
    """w1/w3 read as one stacked matrix, the polynomial-exp SwiGLU, many rows a block at a time."""

    stack: StackedRows | None = None  # set by `stack_projections`

    def stack_projections(self) -> None:
        self.stack = StackedRows.of(self.w1, self.w3)

    def current_stack(self) -> StackedRows | None:
        if self.stack is not None and not self.stack.is_current(self.w1, self.w3):
            self.stack = None
        return self.stack

    def gate_up(self, x: mx.array) -> tuple[mx.array, mx.array]:
        stack = self.current_stack()
        return tuple(stack(x)) if stack is not None else super().gate_up(x)

    def __call__(self, x: mx.array) -> mx.array:
        return ops.in_row_blocks(super().__call__, x, 2 * output_width(self.w1))


class CpuVisionAttention(siglip2.Attention):
    def attend(self, q: mx.array, k: mx.array, v: mx.array) -> mx.array:
        return ops.attention(q, k, v, self.scale)


class CpuVisionMLP(siglip2.MLP):
    """Many rows (six tiles: 6144) a block at a time."""

    def __call__(self, x: mx.array) -> mx.array:
        return ops.in_row_blocks(super().__call__, x, output_width(self.fc1))
