"""MLX's CPU backend (`mlx_lfm2vl/cpu/`) against MLX's own ops and the plain model: kernels,
swapped layers, stacked projections, the compiled one-token step, threads, memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_lfm2vl.cpu import ops as kernels
from mlx_lfm2vl.cpu.layers import CpuLinear, CpuQuantizedLinear
from mlx_lfm2vl.cpu.ops import quantized_matvec

pytestmark = pytest.mark.cpu_backend


def test_polynomial_exp_is_within_2e7_relative_of_float64_exp_over_the_float32_range():
    x = mx.linspace(-87.3, 88.3, 1_000_001)
    got = np.array(mx.compile(kernels._exp)(x)).astype(np.float64)
    want = np.exp(np.array(x).astype(np.float64))
    assert np.max(np.abs(got - want) / want) < 2e-7


def test_polynomial_exp_underflows_to_zero_and_saturates_finite():
    x = mx.array([-np.inf, -1000.0, -87.4, np.inf, 1000.0])
    got = np.array(mx.compile(kernels._exp)(x))
    np.testing.assert_array_equal(got[:3], 0.0)
    assert np.all(np.isfinite(got[3:])) and np.all(got[3:] > 1e38)


def test_softmax_fast_path_matches_mlx_softmax():
    x = mx.random.normal((3, 5, 70, 300), key=mx.random.key(0)) * 8
    x[..., :10] = -mx.inf  # masked positions must get exactly 0
    got = kernels.softmax(x)
    np.testing.assert_allclose(got, mx.softmax(x, axis=-1, precise=True), rtol=2e-6, atol=1e-7)
    assert np.all(np.array(got[..., :10]) == 0.0)


@pytest.mark.parametrize("keys", [512, 700, 1800])
def test_one_query_attention_matches_mlx_attention(keys):
    q = mx.random.normal((1, 16, 1, 64), key=mx.random.key(keys)) * 3
    k = mx.random.normal((1, 8, keys, 64), key=mx.random.key(keys + 1))
    v = mx.random.normal((1, 8, keys, 64), key=mx.random.key(keys + 2))
    assert keys >= kernels._ONE_QUERY_MIN_KEYS  # `attention` takes the one-query path
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125)
    np.testing.assert_allclose(kernels.attention(q, k, v, 0.125), want, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_fast_path_matches_the_tanh_formula_and_the_models_gelu():
    from mlx_lfm2vl.models.siglip2 import gelu_tanh

    x = mx.random.normal((4, 1000), key=mx.random.key(1)) * 6
    want = 0.5 * x * (1 + mx.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(kernels.gelu_tanh(x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gelu_tanh(x), want, rtol=1e-5, atol=1e-6)


def test_swiglu_fast_path_matches_silu_times_up():
    gate = mx.random.normal((4, 1000), key=mx.random.key(2)) * 20
    up = mx.random.normal((4, 1000), key=mx.random.key(3))
    np.testing.assert_allclose(kernels.swiglu(gate, up), nn.silu(gate) * up, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "heads, kv_heads, queries, keys, causal",
    [
        (12, 12, 1024, 1024, False),  # a vision view
        (16, 8, 700, 700, True),  # a prompt: GQA, two query blocks
        (16, 8, 300, 1100, True),  # a chunk appended to a cache
        (6, 3, 600, 600, True),  # kv heads not a multiple of the lanes
        (4, 1, 400, 400, False),  # one kv head: one lane
    ],
)
def test_cpu_attention_matches_scaled_dot_product_attention(heads, kv_heads, queries, keys, causal):
    assert queries * keys >= kernels._SPLIT_MIN_PAIRS  # the split path, not the fallback
    keys_q, keys_k, keys_v = mx.random.split(mx.random.key(heads * queries + keys), 3)
    q = mx.random.normal((1, heads, queries, 64), key=keys_q)
    k = mx.random.normal((1, kv_heads, keys, 64), key=keys_k)
    v = mx.random.normal((1, kv_heads, keys, 64), key=keys_v)
    got = kernels.attention(q, k, v, 0.125, causal)
    want = mx.fast.scaled_dot_product_attention(
        q, k, v, scale=0.125, mask="causal" if causal else None
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)


def test_row_blocks_give_each_row_what_one_call_gives(monkeypatch):
    monkeypatch.setattr(kernels, "_ROW_BLOCK", 64 * 100)  # 64 rows per block at width 100
    weight = mx.random.normal((100, 48), key=mx.random.key(1))
    calls = []

    def rows(x: mx.array) -> mx.array:
        calls.append(x.shape[0])
        return kernels.gelu_tanh(x @ weight.T)[..., :30]

    x = mx.random.normal((3, 700, 48), key=mx.random.key(2))
    got = kernels.in_row_blocks(rows, x, 100)
    assert calls == [64] * 32 + [2100 - 32 * 64]
    assert got.shape == (3, 700, 30)
    np.testing.assert_allclose(got, rows(x), rtol=1e-5, atol=1e-5)  # BLAS blocking: ulps


def test_row_blocks_leave_few_rows_and_other_devices_dtypes_to_one_call(monkeypatch):
    monkeypatch.setattr(kernels, "_ROW_BLOCK", 64 * 100)
    calls = []

    def rows(x: mx.array) -> mx.array:
        calls.append(x.shape)
        return x * 2

    kernels.in_row_blocks(rows, mx.ones((64, 8)), 100)
    kernels.in_row_blocks(rows, mx.ones((1000, 8), mx.bfloat16), 100)
    assert calls == [(64, 8), (1000, 8)]


def test_attention_in_bfloat16_is_mlx_sdpa_itself():
    q = mx.random.normal((1, 4, 300, 64), key=mx.random.key(5)).astype(mx.bfloat16)
    got = kernels.attention(q, q, q, 0.125, causal=True)
    want = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.125, mask="causal")
    assert mx.array_equal(got, want)


def _after_load(checkpoint, keep: str | None) -> list[str]:
    """[whether a 100 MiB malloc was mmapped, whether MLX's cache limit is untouched] after
    load() in a fresh process."""
    code = textwrap.dedent(f"""
        import ctypes
        import mlx.core as mx
        from mlx_lfm2vl.loading import load_model

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in (
                "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        limit = mx.set_cache_limit(1 << 30)
        mx.set_cache_limit(limit)
        load_model({str(checkpoint)!r})
        before = libc.mallinfo2().hblkhd
        block = libc.malloc(100 << 20)
        mapped = libc.mallinfo2().hblkhd - before >= 100 << 20
        print(mapped, mx.set_cache_limit(limit) == limit)
    """)
    env = dict(os.environ)
    env.pop("MLX_LFM2VL_KEEP_FREED_MEMORY", None)
    if keep is not None:
        env["MLX_LFM2VL_KEEP_FREED_MEMORY"] = keep
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return done.stdout.split()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc tuning is Linux-only")
def test_load_keeps_freed_memory_in_glibcs_heap_unless_told_not_to(checkpoint_450m):
    # A 100 MiB block comes from the heap with the raised threshold, from mmap without it
    # (glibc's own threshold stops at 32 MiB); MLX's cache limit stays as the app set it.
    assert _after_load(checkpoint_450m, None) == ["False", "True"]
    assert _after_load(checkpoint_450m, "0") == ["True", "True"]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])  # bf16 is split over the lanes
def test_one_row_linear_matches_the_full_matmul(dtype):
    layer = CpuLinear(1024, 2048, bias=False)
    layer.set_dtype(dtype)
    assert layer.weight.size >= kernels._SPLIT_MIN_WEIGHTS
    x = mx.random.normal((1, 1, 1024), key=mx.random.key(6)).astype(dtype)
    want = (x.astype(mx.float32) @ layer.weight.astype(mx.float32).T).astype(dtype)
    np.testing.assert_allclose(
        layer(x).astype(mx.float32), want.astype(mx.float32), rtol=2e-2, atol=2e-2
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_one_row_quantized_linear_split_over_lanes_matches_mlx_quantized_linear(bits):
    layer = CpuLinear(1024, 2048, bias=True).to_quantized(group_size=64, bits=bits)
    assert isinstance(layer, CpuQuantizedLinear)
    plain = nn.QuantizedLinear(1024, 2048, bias=True, group_size=64, bits=bits)
    plain.update(layer.parameters())
    x = mx.random.normal((1, 1, 1024), key=mx.random.key(bits))
    np.testing.assert_allclose(layer(x), plain(x), rtol=1e-5, atol=1e-5)


def test_one_row_quantized_embedding_head_matches_as_linear():
    embedding = nn.Embedding(4096, 512).to_quantized(group_size=64, bits=4)
    x = mx.random.normal((1, 1, 512), key=mx.random.key(7))
    np.testing.assert_allclose(
        quantized_matvec(embedding, x), embedding.as_linear(x), rtol=1e-5, atol=1e-5
    )


def _unfused_feed_forward(ff, x: mx.array) -> mx.array:
    return ff.w2(nn.silu(ff.w1(x)) * ff.w3(x))


def _unfused_qkv(attn, x: mx.array) -> list[mx.array]:
    return [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]


def test_loaded_projections_are_stacked_views_that_give_the_unstacked_outputs(checkpoint_450m):
    from mlx.utils import tree_flatten

    from mlx_lfm2vl import load
    from mlx_lfm2vl.models.lfm2_vl import Lfm2VlModel

    model, _ = load(checkpoint_450m)
    lm = model.language_model
    fresh = Lfm2VlModel(model.config)
    assert [k for k, _ in tree_flatten(model.parameters())] == [
        k for k, _ in tree_flatten(fresh.parameters())
    ]
    attention_layers = [layer for layer in lm.layers if layer.is_attention_layer]
    assert attention_layers and all(layer.self_attn.stack for layer in attention_layers)
    ff = lm.layers[0].feed_forward
    stacked = ff.stack.stacked
    assert mx.array_equal(stacked[: ff.w1.weight.shape[0]], ff.w1.weight)
    assert mx.array_equal(stacked[ff.w1.weight.shape[0] :], ff.w3.weight)
    attn = attention_layers[0].self_attn
    for rows in (1, 7):  # the matrix-vector path and the matmul path
        x = mx.random.normal((1, rows, ff.w1.weight.shape[1]), key=mx.random.key(rows))
        np.testing.assert_allclose(ff(x), _unfused_feed_forward(ff, x), rtol=1e-5, atol=1e-6)
        for got, want in zip(attn.qkv(x), _unfused_qkv(attn, x), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_replacing_a_stacked_weight_runs_unstacked_and_releases_the_stack(checkpoint_450m):
    from mlx_lfm2vl import load

    model, _ = load(checkpoint_450m)
    ff = model.language_model.layers[0].feed_forward
    ff.w1.weight = ff.w1.weight * 2
    x = mx.random.normal((1, 1, ff.w1.weight.shape[1]), key=mx.random.key(3))
    np.testing.assert_allclose(ff(x), _unfused_feed_forward(ff, x), rtol=1e-6, atol=1e-7)
    assert ff.stack is None

    # Quantized after loading: the first call must already use the quantized q/k/v (a stale
    # stack would give the float output), the second runs unfused by construction.
    attn = next(layer for layer in model.language_model.layers if layer.is_attention_layer)
    attn = attn.self_attn
    before = attn(x)
    nn.quantize(model.language_model, group_size=32, bits=8)
    first = attn(x)
    assert attn.stack is None
    second = attn(x)
    assert mx.array_equal(first, second) and not mx.array_equal(first, before)


def _decode_tokens(model, prompt: mx.array, tokens: mx.array):
    """Logits of each of `tokens` fed one at a time after `prompt`, and the final cache."""
    cache = model.make_cache()
    model(prompt, cache=cache)
    logits = [model(tokens[:, i : i + 1], cache=cache) for i in range(tokens.shape[1])]
    return mx.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("adapters", [False, True], ids=["plain", "lora"])
def test_compiled_one_token_step_matches_the_layer_by_layer_path(
    checkpoint_450m, lora_adapters, monkeypatch, adapters
):
    """Also with LoRA adapters on every projection: their matrices are inputs of the trace."""
    from mlx_lfm2vl import load
    from mlx_lfm2vl.cpu.step import LayerStep

    model, _ = load(checkpoint_450m, adapter_path=lora_adapters if adapters else None)
    prompt = mx.array([[1, 500, 501, 502, 503, 504, 505]])
    tokens = mx.array([[600, 601, 602, 603]])
    compiled_step = LayerStep.__call__
    taken = []

    def recording_step(self, x, cache, offset):
        taken.append(self.layer.is_attention_layer)
        return compiled_step(self, x, cache, offset)

    monkeypatch.setattr(LayerStep, "__call__", recording_step)
    got, got_cache = _decode_tokens(model, prompt, tokens)
    layers = model.language_model.layers
    assert len(taken) == len(layers) * tokens.shape[1] and set(taken) == {True, False}

    monkeypatch.setattr(LayerStep, "usable", lambda self, activations: False)
    want, want_cache = _decode_tokens(model, prompt, tokens)
    # The compiled step multiplies the same numbers in another order (one fused loop, a matvec
    # instead of a matmul): float32 rounding apart, relative to each array's magnitude.
    scale = max(1.0, float(mx.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    for mine, theirs in zip(got_cache, want_cache, strict=True):
        assert mine.offset == theirs.offset == prompt.shape[1] + tokens.shape[1]
        for a, b in zip(mine.state, theirs.state, strict=True):
            scale = max(1.0, float(mx.abs(b).max()))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_quantized_layers_decode_without_the_compiled_step(checkpoint_450m):
    from mlx_lfm2vl import load

    model, _ = load(checkpoint_450m)
    nn.quantize(model.language_model, group_size=32, bits=8)
    steps = model.language_model.steps.layers
    assert not any(step.usable(mx.float32) for step in steps)
    cache = model.make_cache()
    model(mx.array([[1, 500, 501]]), cache=cache)
    logits = model(mx.array([[502]]), cache=cache)
    assert logits.shape == (1, 1, model.config.text.vocab_size)
    assert bool(mx.all(mx.isfinite(logits)))
    assert all(c.offset == 4 for c in cache)


def test_the_cpu_backend_keeps_parameter_names_and_the_plain_models_numbers(checkpoint_450m):
    """load() with and without the CPU backend: the same parameter tree, and logits within
    float32 rounding for a prompt, then one token at a time."""
    from mlx.utils import tree_flatten

    import mlx_lfm2vl.loading
    from mlx_lfm2vl.cpu.layers import CpuAttention, CpuFeedForward, CpuVisionMLP
    from mlx_lfm2vl.loading import load_model

    prepared = load_model(checkpoint_450m)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mlx_lfm2vl.loading, "computes_on_cpu", lambda: False)
        plain = load_model(checkpoint_450m)
    kinds = {type(m) for _, m in prepared.named_modules()}
    assert {CpuAttention, CpuFeedForward, CpuVisionMLP} <= kinds
    assert not any(
        type(m).__module__.startswith("mlx_lfm2vl.cpu") for _, m in plain.named_modules()
    )
    assert [k for k, _ in tree_flatten(prepared.parameters())] == [
        k for k, _ in tree_flatten(plain.parameters())
    ]
    prompt = mx.array([[1, 500, 501, 502, 503, 504, 505]])
    tokens = mx.array([[600, 601, 602]])
    got, _ = _decode_tokens(prepared, prompt, tokens)
    want, _ = _decode_tokens(plain, prompt, tokens)
    scale = max(1.0, float(mx.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


def test_generation_works_from_two_threads_in_turn_and_from_a_worker_after_the_main_thread(
    checkpoint_16b,
):
    """MLX streams belong to the thread that made them (MLX >= 0.32): the CPU backend's lanes
    are per thread. A tiled image prompt uses the lanes (attention over many patches)."""
    from reference import random_image

    from mlx_lfm2vl import generate, load

    model, processor = load(checkpoint_16b)
    image = random_image(300, 700, seed=3)
    request = dict(images=[image], max_tokens=4, temperature=0.0, max_tiles=2)
    first = generate(model, processor, "Describe.", **request).tokens  # the main thread
    results, errors = {}, []

    def worker(name: str) -> None:
        try:
            results[name] = generate(model, processor, "Describe.", **request).tokens
        except Exception as error:  # re-raised below, in the test's thread
            errors.append(error)

    for name in ("worker-1", "worker-2"):
        thread = threading.Thread(target=worker, args=(name,))
        thread.start()
        thread.join()
    assert not errors, errors
    assert results == {"worker-1": first, "worker-2": first}


def test_compiled_steps_of_a_model_freed_on_another_thread_never_answer_for_a_new_model(
    checkpoint_450m, checkpoint_16b
):
    """MLX caches a trace per thread under the address of the compiled Python function and
    drops it only on the thread that frees the function: steps of models freed elsewhere once
    answered for later models (the 1.6B fixture's graph for the 450M's layers). The full suite's
    order reproduced it (tests/test_batch.py, then test_batch_cli.py, then test_cli.py); this
    churn of models, threads and collections is a guard that does not always reproduce it."""
    import gc

    from mlx_lfm2vl import generate, load
    from mlx_lfm2vl.batch import BatchWorker
    from mlx_lfm2vl.cpu.step import LayerStep

    def greedy(folder, worker: bool = False) -> list[int]:
        model, processor = load(folder)
        if worker:  # one row alone: the compiled step, on the worker's thread
            with BatchWorker(model, processor) as batch:
                chunks = batch.submit("Hello there", max_tokens=4, temperature=0.0)
                return [chunk.token for chunk in chunks]
        return generate(model, processor, "Hello there", max_tokens=4, temperature=0.0).tokens

    with pytest.MonkeyPatch.context() as patch:  # each layer the general way
        patch.setattr(LayerStep, "usable", lambda self, activations: False)
        want = {folder: greedy(folder) for folder in (checkpoint_450m, checkpoint_16b)}
    gc.disable()  # models are freed when this test says, on the thread it says
    try:
        for round in range(8):
            folder = (checkpoint_16b, checkpoint_450m)[round % 2]
            assert greedy(folder, worker=round % 4 < 2) == want[folder], (round, folder.name)
            collector = threading.Thread(target=gc.collect)
            collector.start()
            collector.join()
    finally:
        gc.enable()
