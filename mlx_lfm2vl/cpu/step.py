"""One-token decode with each layer compiled, for MLX's CPU backend.

Between its weight reads a decode step is many small ops (norms, gates, the conv taps, RoPE), and
on MLX's CPU backend each op costs a few microseconds to build and to dispatch whatever its size:
~1750 graph nodes for the 450M model, 11-12 ms of a 56 ms float32 step. Compiled, each layer's
element-wise ops run as a few fused loops.

What is compiled is the layer's own code: `DecoderLayer.__call__` for a short-conv layer (its
state passed in and out), and for an attention layer the two halves around the attention over
the growing cache (`Attention.queries_keys_values`, then `Attention.output` and
`DecoderLayer.feed_forward_block`). Shapes are fixed for one token, so each is traced once.

Two properties of `mx.compile` (MLX 0.32) shape how:

- A trace is cached under the address of the Python function, in a cache per thread, and is
  dropped only from the cache of the thread that frees the function. A function freed on
  another thread (a garbage collection can run on any thread) leaves its traces behind, and a
  new function at the same address would then run another layer's graph: traces of the 1.6B
  fixture were seen answering for the 450M one. So the compiled functions here are never freed
  (`_KEEP`: a few hundred bytes per layer), and they reach their layer through a weak reference.
- Arrays a trace reads without taking them as inputs are kept in it as constants. So every array
  of the layer is an input, read afresh at each call: the layer's own parameters are put in
  place of the tracers while the trace runs, then the very same objects are put back (the
  identity checks of the stacked projections, `StackedRows.is_current`, rely on that). A trace
  then holds no weights, and weights replaced in place are simply used.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from ..cache import ConvCache, KVCache
from ..lora import LoRALinear
from ..models.lfm2 import DecoderLayer, Lfm2Model
from .layers import CpuAttention, CpuFeedForward, CpuLinear

# Compiled step functions are kept for the life of the process: see the module docstring.
_KEEP: list[Callable] = []

# Where an array of a layer lives: (container, key) for an entry of a module, list or dict, or
# (object, attribute name) for a stack (`StackedRows.stacked`), with a flag for which.
Slot = tuple[object, str | int, bool]


def _read(slot: Slot) -> object:
    owner, key, attribute = slot
    return getattr(owner, key) if attribute else owner[key]


def _write(slot: Slot, value: object) -> None:
    owner, key, attribute = slot
    if attribute:
        setattr(owner, key, value)
    else:
        owner[key] = value


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
        self.stacks = [
            (owner, owner.stack)
            for owner in (layer.get("self_attn"), layer.feed_forward)
            if isinstance(owner, (CpuAttention, CpuFeedForward))
        ]
        views = {id(view) for _, stack in self.stacks if stack is not None for view in stack.views}
        self.modules: list[tuple[object, str | int, nn.Module]] = []
        self.slots: list[Slot] = []
        self._find_arrays(layer, views)
        self.slots += [(stack, "stacked", True) for _, stack in self.stacks if stack is not None]
        self.stale = False

        me = weakref.ref(self)
        if layer.is_attention_layer:

            def rotated_qkv(arrays, x, offset):
                with me().bound(arrays):
                    attention = me().layer.self_attn
                    return attention.queries_keys_values(me().layer.operator_norm(x), offset)

            def finish(arrays, x, attended):
                with me().bound(arrays):
                    layer = me().layer
                    return layer.feed_forward_block(x + layer.self_attn.output(attended))

            self.rotated_qkv, self.finish = mx.compile(rotated_qkv), mx.compile(finish)
            _KEEP.extend([self.rotated_qkv, self.finish])
        else:

            def conv_layer(arrays, x, state):
                with me().bound(arrays):
                    cache = ConvCache()
                    cache.conv_state = state
                    return me().layer(x, None, cache), cache.conv_state

            self.conv_layer = mx.compile(conv_layer)
            _KEEP.append(self.conv_layer)

    def _find_arrays(self, container: dict | list, views: set[int]) -> None:
        """The modules (for `usable`) and array slots (the inputs) under `container`; the rows
        of a stack are read through the stack, so its views are not inputs of their own."""
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in items:
            if isinstance(value, nn.Module):
                self.modules.append((container, key, value))
            if isinstance(value, mx.array) and id(value) not in views:
                self.slots.append((container, key, False))
            if isinstance(value, (dict, list)):
                self._find_arrays(value, views)

    def bound(self, arrays: list[mx.array]) -> _Bound:
        """Within the block, the layer reads `arrays` (the tracers while MLX traces)."""
        return _Bound(self.slots, arrays)

    def usable(self, activations: mx.Dtype) -> bool:
        """Whether the layer still has the modules and stacks it was built with, and every
        product is one op (quantized layers, bf16 without the forwarder, or replaced modules run
        the general way)."""
        if not self.stale and not (
            all(container[key] is module for container, key, module in self.modules)
            and all(owner.current_stack() is stack for owner, stack in self.stacks)
        ):
            self.stale = True
        return not self.stale and all(_in_one_op(p, activations) for p in _projections(self.layer))

    def __call__(self, x: mx.array, cache: KVCache | ConvCache, offset: mx.array) -> mx.array:
        arrays = [_read(slot) for slot in self.slots]
        if not self.layer.is_attention_layer:
            state = cache.conv_state
            if state is None:
                state = mx.zeros((1, self.layer.conv.kernel_size - 1, x.shape[-1]), x.dtype)
            out, cache.conv_state = self.conv_layer(arrays, x, state)
            cache.offset += 1
            return out
        q, k, v = self.rotated_qkv(arrays, x, offset)
        keys, values = cache.update_and_fetch(k, v)
        return self.finish(arrays, x, self.layer.self_attn.attend(q, keys, values, None))


class _Bound:
    """Puts arrays in a layer's slots for the length of a block, then the originals back."""

    def __init__(self, slots: list[Slot], arrays: list[mx.array]):
        self.slots, self.arrays = slots, arrays

    def __enter__(self) -> None:
        self.originals = [_read(slot) for slot in self.slots]
        for slot, array in zip(self.slots, self.arrays, strict=True):
            _write(slot, array)

    def __exit__(self, *exc: object) -> None:
        for slot, original in zip(self.slots, self.originals, strict=True):
            _write(slot, original)


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
