"""The optional BLAS preload of `cpu_backend.py`: one-row float32 matmuls forwarded to gemv.

The forwarder rewrites BLAS arguments (leading dimensions, strides, transposes), where a slip gives
wrong numbers rather than an error, so every layout MLX can hand to cblas_sgemm with one row or one
column is checked against NumPy, in a process that preloads it in front of OpenBLAS.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_lfm2vl import cpu_backend
from mlx_lfm2vl.errors import Lfm2VlError

pytestmark = pytest.mark.skipif(
    sys.platform != "linux", reason="the BLAS preload is for MLX's CPU backend on Linux"
)

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


@pytest.fixture(scope="module")
def preload(tmp_path_factory) -> str:
    try:
        return cpu_backend.blas_preload(tmp_path_factory.mktemp("blas"))
    except Lfm2VlError as error:  # in CI a missing OpenBLAS or compiler is a failure, not a skip
        pytest.fail(f"cannot build the BLAS preload here: {error}")


def test_forwarded_one_row_and_one_column_matmuls_match_numpy_in_every_layout(preload):
    env = dict(os.environ, LD_PRELOAD=preload)
    done = subprocess.run(
        [sys.executable, "-c", _LAYOUTS_CHECK], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_preload_line_puts_the_forwarder_in_front_of_openblas(preload):
    forwarder, openblas = preload.split()
    assert Path(forwarder).name.startswith("libgemv_forward-") and Path(forwarder).exists()
    assert openblas == str(cpu_backend.find_openblas())


def test_forwarder_is_built_once_and_reused(tmp_path):
    first = cpu_backend.build_gemv_forward(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_backend.build_gemv_forward(tmp_path) == first
    assert first.stat().st_mtime_ns == stamp


def test_missing_compiler_is_a_clear_error_that_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(Lfm2VlError, match="set CC"):
        cpu_backend.build_gemv_forward(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_failed_compile_is_a_clear_error_that_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(Lfm2VlError, match="building the gemv forwarder failed"):
        cpu_backend.build_gemv_forward(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_openblas_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(cpu_backend, "_OPENBLAS_CANDIDATES", ["/nonexistent/libopenblas.so.0"])
    monkeypatch.setattr(cpu_backend.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(Lfm2VlError, match="apt-get install libopenblas0-pthread"):
        cpu_backend.find_openblas()


def test_command_line_prints_the_preload_line_or_one_error_line(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("LD_PRELOAD", None)
    command = [sys.executable, "-m", "mlx_lfm2vl.cpu_backend"]
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
