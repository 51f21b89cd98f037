"""The BLAS preload of `cpu/blas.py`: one-row float32 matmuls forwarded to gemv, bf16 weights
multiplied in float32, and how the port finds, checks and relaunches with it.

The forwarder rewrites BLAS arguments (leading dimensions, strides, transposes), where a slip gives
wrong numbers rather than an error, so every layout MLX can hand to cblas_sgemm with one row or one
column is checked against NumPy, in a process that preloads it in front of OpenBLAS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_lfm2vl.cpu import blas
from mlx_lfm2vl.errors import Lfm2VlError

pytestmark = [
    pytest.mark.cpu_backend,
    pytest.mark.skipif(
        sys.platform != "linux", reason="the BLAS preload is for MLX's CPU backend on Linux"
    ),
]

# Runs under LD_PRELOAD="forwarder openblas". Prints "ok" or the first failing case.
_LAYOUTS_CHECK = r"""
import ctypes
import mlx.core as mx
import numpy as np

mx.set_default_device(mx.cpu)
rng = np.random.default_rng(0)

def normal(*shape):
    return rng.standard_normal(shape).astype(np.float32)

def check(name, got, want):
    got, want = np.array(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.abs(want).max()))
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-5 * scale):
        raise SystemExit(f"{name}: max error {np.abs(got - want).max()}")

K, N = 300, 257
w = normal(N, K)  # a weight in nn.Linear's (out, in) layout
x = normal(1, K)
wide = normal(N, K + 9)[:, 3 : 3 + K]  # rows with a leading dimension larger than K
cases = {
    "row @ weight.T": (mx.array(x) @ mx.array(w).T, x @ w.T),
    "row @ weight (k x n)": (mx.array(x) @ mx.array(w.T.copy()), x @ w.T),
    "a column of a matrix, transposed, @ weight.T": (
        mx.array(np.hstack([x.T, 2 * x.T, 3 * x.T]))[:, 1:2].T @ mx.array(w).T,
        2 * x @ w.T,
    ),
    "weight @ column": (mx.array(w) @ mx.array(x.T.copy()), w @ x.T),
    "weight @ row.T": (mx.array(w) @ mx.array(x).T, w @ x.T),
    "weight @ a row of a matrix, transposed": (
        mx.array(w) @ mx.array(np.vstack([x, 2 * x, 3 * x]))[1:2].T,
        2 * w @ x.T,
    ),
    "weight.T.T @ column": (mx.array(w.T.copy()).T @ mx.array(x.T.copy()), w @ x.T),
    "strided weight rows": (mx.array(x) @ mx.array(wide).T, x @ wide.T),
    "one by one": (mx.array(x[:, :1]) @ mx.array(w[:1, :1]), x[:, :1] @ w[:1, :1]),
}
for name, (got, want) in cases.items():
    check(name, got, want)

batch = normal(3, 1, K)
check("batched rows", mx.array(batch) @ mx.array(w).T, batch @ w.T)
bias = normal(1, N)
check("addmm", mx.addmm(mx.array(bias), mx.array(x), mx.array(w).T, alpha=0.5, beta=2.0),
      2.0 * bias + 0.5 * (x @ w.T))
big = normal(64, K)
check("many rows pass through to gemm", mx.array(big) @ mx.array(w).T, big @ w.T)

# MLX copies strided operands, so the padded and transposed layouts cblas_sgemm allows are called
# directly. beta = 0 must overwrite whatever the output held (MLX reuses freed memory), NaN too.
sgemm = ctypes.CDLL(None).cblas_sgemm  # the first definition: the preloaded forwarder's
i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
NO_TRANS, TRANS = 111, 112
for m, n in [(1, N), (N, 1), (1, 1)]:
    for trans_a in (NO_TRANS, TRANS):
        for trans_b in (NO_TRANS, TRANS):
            op_a, op_b = normal(m, K), normal(K, n)
            stored_a = op_a if trans_a == NO_TRANS else op_a.T
            stored_b = op_b if trans_b == NO_TRANS else op_b.T
            a = np.zeros((stored_a.shape[0], stored_a.shape[1] + 5), np.float32)
            b = np.zeros((stored_b.shape[0], stored_b.shape[1] + 7), np.float32)
            a[:, : stored_a.shape[1]], b[:, : stored_b.shape[1]] = stored_a, stored_b
            c = np.full((m, n + 3), np.nan, np.float32)
            sgemm(101, trans_a, trans_b, m, n, K, 1.5, a.ctypes.data, a.shape[1],
                  b.ctypes.data, b.shape[1], 0.0, c.ctypes.data, c.shape[1])
            check(f"sgemm m={m} n={n} trans {trans_a},{trans_b}", c[:, :n], 1.5 * op_a @ op_b)
print("ok")
"""


# bf16 weights times float32 rows in the forwarder (`ops.bf16_matmul`), against float64
# products of the same values: up to 48 rows (their own kernel; shapes around its 4-row blocks
# and its two-thread split) and more (panels widened for sgemm).
_BF16_PRODUCTS_CHECK = r"""
import mlx.core as mx
import numpy as np
from mlx_lfm2vl.cpu.ops import bf16_matmul, reads_bf16_weights

mx.set_default_device(mx.cpu)
assert reads_bf16_weights(mx.zeros((4, 8), mx.bfloat16), mx.float32)
rng = np.random.default_rng(0)
shapes = [(1, 2), (7, 10), (63, 1030), (64, 1024), (257, 300), (1030, 4608), (3, 64)]
for (rows, cols), m in zip(shapes * 2, [1] * len(shapes) + [2, 3, 5, 17, 40, 9, 64]):
    stack = mx.array(rng.standard_normal((rows + 5, cols)).astype(np.float32)).astype(mx.bfloat16)
    for name, w in (("whole", stack[:rows]), ("rows of a stack", stack[5:])):
        x = mx.array(rng.standard_normal((1, m, cols)).astype(np.float32))
        got = np.array(bf16_matmul(w, x))
        w64, x64 = np.array(w.astype(mx.float32), np.float64), np.array(x, np.float64)
        want = x64 @ w64.T
        # float32 rounding of a sum of `cols` products: bounded by the sum of their magnitudes
        bound = 1e-5 * (np.abs(x64) @ np.abs(w64).T) + 1e-30
        if got.shape != (1, m, rows) or not (np.abs(got - want) <= bound).all():
            raise SystemExit(f"{m} x {rows}x{cols} {name}: max error {np.abs(got - want).max()}")
# Up to 48 rows share each read of the weight (a batched decode step); every row's products must
# be bitwise those of the row alone, whatever its neighbours, or a request's answer would depend
# on its batch.
for rows, cols in [(1030, 4608), (257, 300), (64, 1024)]:
    w = mx.array(rng.standard_normal((rows, cols)).astype(np.float32)).astype(mx.bfloat16)
    for m in (2, 3, 8, 31, 48):
        x = mx.array(rng.standard_normal((m, cols)).astype(np.float32))
        together = np.array(bf16_matmul(w, x))
        for i in range(m):
            alone = np.array(bf16_matmul(w, x[i : i + 1]))[0]
            if not np.array_equal(together[i], alone):
                raise SystemExit(f"row {i} of {m} x {rows}x{cols}: differs from the row alone")
# Panels: a weight wider than one 8 MiB panel of float32 rows, cut into several.
w = mx.array(rng.standard_normal((3000, 1024)).astype(np.float32)).astype(mx.bfloat16)
x = mx.array(rng.standard_normal((6, 1024)).astype(np.float32))
want = np.array(x, np.float64) @ np.array(w.astype(mx.float32), np.float64).T
if not np.allclose(np.array(bf16_matmul(w, x)), want, rtol=1e-4, atol=1e-3):
    raise SystemExit("panels: wrong product")
print("ok")
"""

# A tagged call in a layout bf16_matmul never makes must stop the process, not compute garbage.
_BF16_BAD_LAYOUT = r"""
import ctypes
import numpy as np
from mlx_lfm2vl.cpu.blas import bf16_product_tag

sgemm = ctypes.CDLL(None).cblas_sgemm
i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
sgemm.argtypes = [i, i, i, i, i, i, f, p, i, p, i, f, p, i]
a, b, c = np.ones((3, 4), np.float32), np.ones((5, 4), np.float32), np.zeros((3, 5), np.float32)
sgemm(101, 111, 112, 3, 5, 4, bf16_product_tag(), a.ctypes.data, 4, b.ctypes.data, 4, 0.0,
      c.ctypes.data, 5)
print("returned")
"""


# A bf16-stored checkpoint loaded for float32 compute keeps its LM matmul weights bf16 and decodes
# through the compiled one-token step with `bf16_matmul`; the same model with every weight upcast
# (the path without the forwarder) must give the same greedy tokens and, to float32 rounding, the
# same logits.
_BF16_MODEL_CHECK = r"""
import sys
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lfm2vl import load
from mlx_lfm2vl.cpu import prepare
from mlx_lfm2vl.generate import generate_step, prefill

kept, processor = load(sys.argv[1])
params = dict(tree_flatten(kept.parameters()))
bf16 = {name for name, value in params.items() if value.dtype == mx.bfloat16}
assert "language_model.embed_tokens.weight" in bf16, sorted(bf16)
assert "language_model.layers.0.feed_forward.w2.weight" in bf16, sorted(bf16)
assert all(name.startswith("language_model.") for name in bf16), sorted(bf16)
assert all(not name.endswith("norm.weight") for name in bf16), sorted(bf16)
# the compiled one-token step takes the bf16 weights
assert all(step.usable(mx.float32) for step in kept.language_model.steps.layers)

upcast, _ = load(sys.argv[1])
upcast.update(tree_map(lambda p: p.astype(mx.float32), upcast.parameters()))
prepare(upcast)  # stacks and compiled steps for the new weights

ids = processor("Name three colours.")["input_ids"]
def greedy(model, n=12):
    cache = model.make_cache()
    logits = prefill(model, ids, None, None, cache=cache)
    steps = generate_step(model, logits, cache, sampler=lambda l, k: mx.argmax(l, -1),
                          max_tokens=n)
    return [int(token) for token, _ in steps]

def stepwise(model, n=12):
    cache = model.make_cache()
    logits = prefill(model, ids, None, None, cache=cache)
    out = [np.array(logits)]
    token = mx.argmax(logits, axis=-1)
    for _ in range(n):
        logits = model(token.reshape(1, 1), cache=cache)[:, -1, :]
        out.append(np.array(logits))
        token = mx.argmax(logits, axis=-1)
    return out

a, b = stepwise(kept), stepwise(upcast)
for step, (x, y) in enumerate(zip(a, b)):
    if x.argmax() != y.argmax() or np.abs(x - y).max() > 1e-4 * max(1.0, np.abs(y).max()):
        raise SystemExit(f"step {step}: max logit difference {np.abs(x - y).max()}")
assert greedy(kept) == greedy(upcast)
print("ok")
"""


@pytest.fixture(scope="module")
def preload(tmp_path_factory) -> str:
    try:
        return blas.blas_preload(tmp_path_factory.mktemp("blas"))
    except Lfm2VlError as error:  # in CI a missing OpenBLAS or compiler is a failure, not a skip
        pytest.fail(f"cannot build the BLAS preload here: {error}")


def test_forwarded_one_row_and_one_column_matmuls_match_numpy_in_every_layout(preload):
    env = dict(os.environ, LD_PRELOAD=preload)
    done = subprocess.run(
        [sys.executable, "-c", _LAYOUTS_CHECK], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_forwarder_multiplies_bf16_weights_in_float32(preload):
    env = dict(os.environ, LD_PRELOAD=preload)
    done = subprocess.run(
        [sys.executable, "-c", _BF16_PRODUCTS_CHECK], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_stored_bf16_weights_decode_like_upcast_ones(preload, checkpoint_450m, tmp_path):
    import torch
    from transformers import Lfm2VlForConditionalGeneration

    folder = tmp_path / "bf16"
    shutil.copytree(checkpoint_450m, folder)
    (folder / "model.safetensors").unlink()
    reference = Lfm2VlForConditionalGeneration.from_pretrained(checkpoint_450m, dtype=torch.float32)
    reference.to(torch.bfloat16).save_pretrained(folder)
    env = dict(os.environ, LD_PRELOAD=preload)
    command = [sys.executable, "-c", _BF16_MODEL_CHECK, str(folder)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_bf16_tag_in_an_unexpected_layout_aborts_with_a_message(preload):
    env = dict(os.environ, LD_PRELOAD=preload)
    done = subprocess.run(
        [sys.executable, "-c", _BF16_BAD_LAYOUT], env=env, capture_output=True, text=True
    )
    assert done.returncode != 0 and "returned" not in done.stdout
    assert "bf16 product call with an unexpected layout" in done.stderr


def test_without_the_forwarder_the_bf16_tag_is_never_offered(preload):
    code = "from mlx_lfm2vl.cpu.blas import bf16_product_tag; print(bf16_product_tag())"
    openblas_only = preload.split()[1]
    for ld_preload, env_flag, offered in (
        (openblas_only, "1", False),
        (preload, "0", False),
        (preload, "1", True),
    ):
        env = dict(os.environ, LD_PRELOAD=ld_preload, MLX_LFM2VL_BF16_WEIGHTS=env_flag)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert (done.stdout.strip() != "None") == offered, (ld_preload, env_flag, done.stdout)


def test_preload_line_puts_the_forwarder_in_front_of_openblas(preload):
    forwarder, openblas = preload.split()
    assert Path(forwarder).name.startswith("libgemv_forward-") and Path(forwarder).exists()
    assert openblas == str(blas.find_openblas())


def test_forwarder_is_built_once_and_reused(tmp_path):
    first = blas.build_gemv_forward(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert blas.build_gemv_forward(tmp_path) == first
    assert first.stat().st_mtime_ns == stamp


def test_missing_compiler_is_a_clear_error_that_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(Lfm2VlError, match="set CC"):
        blas.build_gemv_forward(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_failed_compile_is_a_clear_error_that_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(Lfm2VlError, match="building the gemv forwarder failed"):
        blas.build_gemv_forward(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_openblas_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(blas, "_OPENBLAS_CANDIDATES", ["/nonexistent/libopenblas.so.0"])
    monkeypatch.setattr(blas.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(Lfm2VlError, match="apt-get install libopenblas0-pthread"):
        blas.find_openblas()


def test_command_line_prints_the_preload_line_or_one_error_line(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("LD_PRELOAD", None)
    command = [sys.executable, "-m", "mlx_lfm2vl.cpu"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(tmp_path / "mlx_lfm2vl" / "libgemv_forward-"))
    env["CC"] = "false"
    for cached in (tmp_path / "mlx_lfm2vl").iterdir():
        cached.unlink()
    failed = subprocess.run(command, env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("error: building the gemv forwarder failed")
    assert len(failed.stderr.strip().splitlines()) == 1


def test_load_warns_once_when_mlx_runs_on_its_bundled_blas(checkpoint_450m, preload):
    code = (
        "import warnings; from mlx_lfm2vl import load\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    load({str(checkpoint_450m)!r})\n"
        "print([str(w.message) for w in caught if w.category is RuntimeWarning])"
    )
    for ld_preload, warned in (("", True), (preload, False)):
        env = dict(os.environ, LD_PRELOAD=ld_preload)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert ("bundled reference BLAS" in done.stdout) == warned, done.stdout


def _run(code: str, ld_preload: str, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, LD_PRELOAD=ld_preload, **env)
    return subprocess.run(
        [sys.executable, "-c", code], env=environment, capture_output=True, text=True
    )


def test_a_canary_product_proves_the_tag_reaches_the_forwarder(preload):
    """Without the forwarder, MLX multiplies the reinterpreted bits: the canary must see it."""
    code = (
        "from mlx_lfm2vl.cpu.blas import _tag_reaches_the_forwarder\n"
        "print(_tag_reaches_the_forwarder(float.fromhex('-0x1.5bf16p-60')))"
    )
    for ld_preload, reaches in ((preload, "True"), (preload.split()[1], "False"), ("", "False")):
        done = _run(code, ld_preload)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == reaches, (ld_preload, done.stdout)


def test_blas_in_use_names_what_mlx_calls_not_a_privately_loaded_openblas(preload):
    """numpy 1.26 bundles its own OpenBLAS, loaded privately (RTLD_LOCAL): MLX never calls it."""
    openblas = preload.split()[1]
    code = (
        "import ctypes\n"
        f"ctypes.CDLL({openblas!r}, mode=ctypes.RTLD_LOCAL)\n"
        "from mlx_lfm2vl.cpu.blas import blas_in_use\n"
        "print(blas_in_use())"
    )
    assert _run(code, "").stdout.startswith("MLX's bundled reference BLAS")
    assert _run(code, openblas).stdout.strip() == Path(openblas).name
    assert _run(code, preload).stdout.strip() == f"{Path(openblas).name} with the gemv forwarder"


def test_relaunch_preloads_the_blas_replays_the_command_and_restores_ld_preload(tmp_path):
    code = (
        "import os, sys\n"
        "from mlx_lfm2vl.cpu.blas import blas_in_use, relaunch_with_blas_preload\n"
        "relaunch_with_blas_preload()\n"
        "print(blas_in_use(), repr(os.environ.get('LD_PRELOAD')), sys.flags.optimize)\n"
    )
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("LD_PRELOAD", None)
    env.pop("MLX_LFM2VL_BLAS_PRELOAD", None)
    done = subprocess.run(
        [sys.executable, "-O", "-c", code], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    # the interpreter option survived, and the programs this one starts get no preload
    assert done.stdout.split()[-3:] == ["forwarder", "None", "1"], done.stdout
    env["LD_PRELOAD"] = ""
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.split()[-2:] == ["''", "0"], done.stdout


def test_an_unwritable_cache_folder_is_a_clear_error_and_the_cli_still_runs(tmp_path):
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    unwritable = not_a_folder / "cache"  # under a file: no folder can be made there
    with pytest.raises(Lfm2VlError, match="XDG_CACHE_HOME"):
        blas.build_gemv_forward(unwritable)
    env = dict(os.environ, XDG_CACHE_HOME=str(unwritable), LD_PRELOAD="")
    command = [sys.executable, "-m", "mlx_lfm2vl.generate", "--help"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "Usage" in done.stdout, done.stderr
    helper = subprocess.run(
        [sys.executable, "-m", "mlx_lfm2vl.cpu"], env=env, capture_output=True, text=True
    )
    assert helper.returncode == 1 and "XDG_CACHE_HOME" in helper.stderr
    assert len(helper.stderr.strip().splitlines()) == 1


def test_a_compiler_given_with_options_in_cc_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "cc -Wall")
    assert blas.build_gemv_forward(tmp_path).exists()
