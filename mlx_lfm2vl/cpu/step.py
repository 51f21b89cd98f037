"""One-token decode with each layer compiled, for MLX's CPU backend.

Between its weight reads a decode step is many small ops (norms, gates, the conv taps, RoPE), and
on MLX's CPU backend each op costs a few microseconds to build and to dispatch whatever its size:
~1750 graph nodes for the 450M model, 11-12 ms of a 56 ms float32 step. Compiled, each layer's
element-wise ops run as a few fused loops.

What is compiled is the layer's own code: `DecoderLayer.__call__` for a short-conv layer (its
state passed in and out), and for an attention layer the two halves around the attention over
the growing cache (`Attention.queries_keys_values`, then `Attention.output` and
`DecoderLayer.feed_forward_block`). Shapes are fixed for one token, so each is traced once.

The trace holds the layer's arrays as constants. (As inputs, `mx.compile(..., inputs=)`, they
would be flattened at every call and come back as new Python objects, which defeats the identity
checks below.) So a step checks, before it runs, that the layer still holds the very modules and
arrays it was traced with; once anything was replaced, the layer runs the general way.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cache import ConvCache, KVCache
from ..lora import LoRALinear
from ..models.lfm2 import DecoderLayer, Lfm2Model
from .layers import CpuAttention, CpuFeedForward, CpuLinear


def _contents(module: nn.Module) -> list[tuple[dict | list, str | int, object]]:
    """(container, key, value) for every module and array reachable from `module`."""
    entries = []

    def walk(container: dict | list) -> None:
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in items:
            if isinstance(value, (mx.array, nn.Module)):
                entries.append((container, key, value))
            if isinstance(value, (dict, list)):
                walk(value)

    walk(module)
    return entries


def _unchanged(entries: list[tuple[dict | list, str | int, object]]) -> bool:
    try:
        return all(container[key] is value for container, key, value in entries)
    except (KeyError, IndexError):
        return False


def _projections(layer: DecoderLayer) -> list:
    mixer = layer.self_attn if layer.is_attention_layer else layer.conv
    names = ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj")
    own = [mixer[name] for name in names if name in mixer]
    ff = layer.feed_forward
    return own + [ff.w1, ff.w2, ff.w3]


def _in_one_op(projection: nn.Module, activations: mx.Dtype) -> bool:
    """Whether a projection runs as single ops: a CpuLinear in one op, or LoRA adapters on one
    (its two small products compile with the rest)."""
    if isinstance(projection, LoRALinear):
        projection = projection.linear
    return type(projection) is CpuLinear and projection.in_one_op(activations)


class LayerStep:
    """One decoder layer on one token (1, 1, D), compiled; `usable()` says whether it may run."""

    def __init__(self, layer: DecoderLayer):
        self.layer = layer
        self.contents = _contents(layer)
        self.stacks = [
            (owner, owner.stack)
            for owner in (layer.get("self_attn"), layer.feed_forward)
            if isinstance(owner, (CpuAttention, CpuFeedForward))
        ]
        self.stale = False
        if layer.is_attention_layer:
            attention = layer.self_attn

            def rotated_qkv(x, offset):
                return attention.queries_keys_values(layer.operator_norm(x), offset)

            def finish(x, attended):
                return layer.feed_forward_block(x + attention.output(attended))

            self.rotated_qkv = mx.compile(rotated_qkv)
            self.finish = mx.compile(finish)
        else:

            def conv_layer(x, state):
                cache = ConvCache()
                cache.conv_state = state
                return layer(x, None, cache), cache.conv_state

            self.conv_layer = mx.compile(conv_layer)

    def usable(self, activations: mx.Dtype) -> bool:
        """Whether the layer is as it was traced and every product is one op (quantized layers,
        bf16 without the forwarder, or replaced weights run the general way)."""
        if not self.stale and not (
            _unchanged(self.contents)
            and all(owner.current_stack() is stack for owner, stack in self.stacks)
        ):
            self.stale = True
        return not self.stale and all(_in_one_op(p, activations) for p in _projections(self.layer))

    def __call__(self, x: mx.array, cache: KVCache | ConvCache, offset: mx.array) -> mx.array:
        if not self.layer.is_attention_layer:
            state = cache.conv_state
            if state is None:
                state = mx.zeros((1, self.layer.conv.kernel_size - 1, x.shape[-1]), x.dtype)
            out, cache.conv_state = self.conv_layer(x, state)
            cache.offset += 1
            return out
        q, k, v = self.rotated_qkv(x, offset)
        keys, values = cache.update_and_fetch(k, v)
        return self.finish(x, self.layer.self_attn.attend(q, keys, values, None))


class _Steps:
    """The compiled steps of a model's layers (a plain holder: not part of the module tree)."""

    def __init__(self, layers: list[DecoderLayer]):
        self.layers = [LayerStep(layer) for layer in layers]


class CpuLfm2Model(Lfm2Model):
    """The backbone, with one token on a cache run through each layer's compiled step."""

    steps: _Steps | None = None  # set by `compile_steps`

    def compile_steps(self) -> None:
        self.steps = _Steps(self.layers)

    def __call__(self, inputs_embeds: mx.array, cache: list | None = None) -> mx.array:
        one_request = cache is not None and all(type(c) in (KVCache, ConvCache) for c in cache)
        if not one_request or inputs_embeds.shape[:2] != (1, 1) or self.steps is None:
            return super().__call__(inputs_embeds, cache)
        h = inputs_embeds
        positions = [c.offset for c in cache if isinstance(c, KVCache)]
        offset = mx.array(positions[0] if positions else 0, mx.int32)
        for layer, step, layer_cache in zip(self.layers, self.steps.layers, cache, strict=True):
            if step.usable(h.dtype):
                h = step(h, layer_cache, offset)
            else:
                h = layer(h, None, layer_cache)
        return self.embedding_norm(h)
