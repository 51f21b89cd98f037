"""The BLAS under MLX's CPU backend on Linux: OpenBLAS behind the port's gemv forwarder.

MLX's CPU wheel runs float32 matmuls on a bundled reference BLAS (~4 GFLOP/s). Preloading the
system's OpenBLAS makes them ~50x faster; preloading `native/gemv_forward.c` in front of it also
sends one-row products (a decode step) to gemv and multiplies bf16 weights in float32 (see its
header). A preload must be in place before the process starts: the generate command line and
scripts that call `mlx_lfm2vl.relaunch_with_fast_blas` relaunch themselves with it
(`relaunch_with_blas_preload`), and `python -m mlx_lfm2vl.cpu` prints the line for everyone else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from ..errors import Lfm2VlError

# Where distributions put OpenBLAS's pthread build (Debian/Ubuntu, then Fedora/RHEL).
_OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
]
_GEMV_FORWARD_SOURCE = Path(__file__).parent / "native" / "gemv_forward.c"


def find_openblas() -> Path:
    """The system's OpenBLAS library; raises Lfm2VlError naming the package to install."""
    for candidate in _OPENBLAS_CANDIDATES:
        if Path(candidate).exists():
            return Path(candidate)
    found = ctypes.util.find_library("openblas")
    if found and Path(found).is_absolute():
        return Path(found)
    raise Lfm2VlError(
        "OpenBLAS not found: install it (Debian/Ubuntu: apt-get install libopenblas0-pthread; "
        "Fedora: dnf install openblas-threads)"
    )


def build_gemv_forward(cache_dir: Path | None = None) -> Path:
    """Compile native/gemv_forward.c (see its header) once; return the shared library's path.

    The library is named by a hash of its source, so an upgraded source builds anew. It is
    compiled to a temporary name and renamed into place, so a failed or concurrent build never
    leaves a half-written library where a preload would find it.
    """
    source = _GEMV_FORWARD_SOURCE.read_bytes()
    cache_dir = cache_dir or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "mlx_lfm2vl"
    )
    target = cache_dir / f"libgemv_forward-{hashlib.sha256(source).hexdigest()[:12]}.so"
    if target.exists():
        return target
    compiler = (
        shlex.split(os.environ.get("CC", ""))
        or [found for found in (shutil.which("cc"), shutil.which("gcc")) if found][:1]
    )
    if not compiler:
        raise Lfm2VlError(
            "no C compiler found to build the gemv forwarder: install one "
            "(Debian/Ubuntu: apt-get install gcc) or set CC"
        )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=cache_dir, suffix=".so.partial")
    except OSError as error:
        raise Lfm2VlError(
            f"cannot write the gemv forwarder to {cache_dir} ({error.strerror}): set "
            "XDG_CACHE_HOME to a writable folder"
        ) from None
    os.close(handle)
    command = [*compiler, "-O2", "-shared", "-fPIC", "-pthread", "-o", partial]
    command.append(str(_GEMV_FORWARD_SOURCE))
    try:
        try:
            result = subprocess.run(command + ["-ldl"], capture_output=True, text=True)
        except OSError as error:
            raise Lfm2VlError(
                f"cannot run the C compiler {' '.join(compiler)!r} ({error}): set CC"
            ) from error
        if result.returncode != 0:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise Lfm2VlError(
                f"building the gemv forwarder failed ({' '.join(command)}): {last_line}"
            )
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def blas_preload(cache_dir: Path | None = None) -> str:
    """The LD_PRELOAD value that gives MLX's CPU backend OpenBLAS with one-row gemv forwarding."""
    if sys.platform != "linux":
        raise Lfm2VlError(
            "a BLAS preload is for MLX's CPU backend on Linux; macOS uses Accelerate/Metal"
        )
    openblas = find_openblas()
    return f"{build_gemv_forward(cache_dir)} {openblas}"


def _global_symbol(name: str) -> ctypes._CFuncPtr | None:
    """`name` as this process's global scope resolves it (dlsym(RTLD_DEFAULT)), else None."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def _library_of(function: ctypes._CFuncPtr) -> str:
    """The file name of the shared library that defines `function` (dladdr)."""

    class DlInfo(ctypes.Structure):
        _fields_ = [
            ("dli_fname", ctypes.c_char_p),
            ("dli_fbase", ctypes.c_void_p),
            ("dli_sname", ctypes.c_char_p),
            ("dli_saddr", ctypes.c_void_p),
        ]

    info = DlInfo()
    dladdr = ctypes.CDLL(None).dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(DlInfo)]
    if not dladdr(ctypes.cast(function, ctypes.c_void_p), ctypes.byref(info)):
        return "?"
    return Path(os.fsdecode(info.dli_fname or b"?")).name


_BF16_TAG_CANARY_SHAPE = (3, 8)  # rows of x, columns of the weight (even, as the kernel needs)


def _tag_reaches_the_forwarder(tag: float) -> bool:
    """Whether a tagged product computes what it should: one small product, sent the way
    `ops.bf16_matmul` sends them, against the same product in float32. False if MLX no longer
    hands this matmul to `cblas_sgemm` (then the tag would multiply bit patterns: 5.8e-17
    instead of 60.9 was seen), or hands it in a layout the forwarder does not take."""
    import mlx.core as mx
    import numpy as np

    m, k = _BF16_TAG_CANARY_SHAPE
    rng = np.random.default_rng(0)
    weight = mx.array(rng.integers(-8, 8, (5, k)).astype(np.float32) / 4).astype(mx.bfloat16)
    x = mx.array(rng.integers(-8, 8, (m, k)).astype(np.float32) / 4)
    out = mx.addmm(
        mx.zeros((1,), mx.float32),
        x.reshape(2 * m, k // 2),
        weight.view(mx.float32).T,
        alpha=tag,
        beta=0.0,
    )[:m]
    want = x @ weight.astype(mx.float32).T  # small integers over 4: exact in any order
    return bool(mx.array_equal(out, want))


@lru_cache(maxsize=1)
def bf16_product_tag() -> float | None:
    """The alpha that asks the preloaded gemv forwarder for a product of bf16 weights in float32
    arithmetic (native/gemv_forward.c, "bf16 weights"), or None: no forwarder that knows it in
    this process, no fast kernel for this CPU, a canary product that came out wrong, or
    MLX_LFM2VL_BF16_WEIGHTS=0 (keep weights in the compute dtype). The tag must never reach a
    plain BLAS, which would multiply bit patterns."""
    if sys.platform != "linux" or os.environ.get("MLX_LFM2VL_BF16_WEIGHTS", "1") == "0":
        return None
    tag_function = _global_symbol("gemv_forward_bf16_tag")  # a preloaded library's symbol
    if tag_function is None:
        return None
    tag_function.restype = ctypes.c_float
    tag = tag_function()  # 0: no fast kernel for this CPU, or no BLAS behind the forwarder
    if not tag or not _tag_reaches_the_forwarder(tag):
        return None
    return tag


def blas_in_use() -> str:
    """Which BLAS this process's MLX calls, for `--verbose` and benchmark headers.

    MLX resolves `cblas_sgemm` in the global scope first (where LD_PRELOAD puts libraries), then
    in its own bundled BLAS; libraries that other packages load privately (numpy's bundled
    OpenBLAS, with renamed symbols) are never what MLX calls, whatever /proc/self/maps shows.
    """
    if sys.platform != "linux":
        return "platform default"
    sgemm = _global_symbol("cblas_sgemm")
    if sgemm is None:
        return "MLX's bundled reference BLAS (slow)"
    name = _library_of(sgemm)
    next_blas = _global_symbol("gemv_forward_next_blas")
    if next_blas is None:
        return name
    next_blas.restype = ctypes.c_char_p
    behind = Path(os.fsdecode(next_blas() or b"")).name or "no BLAS (every matmul aborts)"
    return f"{behind} with the gemv forwarder"


def slow_blas_warning() -> str | None:
    """What to tell a user whose MLX runs float32 matmuls on its bundled reference BLAS."""
    if sys.platform != "linux" or not blas_in_use().startswith("MLX's bundled"):
        return None
    fix = 'start Python with LD_PRELOAD="$(python -m mlx_lfm2vl.cpu)"'
    try:
        find_openblas()
    except Lfm2VlError:
        fix = "install OpenBLAS (apt-get install libopenblas0-pthread), then " + fix
    return (
        "MLX is using its bundled reference BLAS, which makes float32 matmuls ~50x slower: "
        f"{fix}, or call mlx_lfm2vl.relaunch_with_fast_blas() first thing"
    )


# Set in a relaunched process: "=" and the LD_PRELOAD its parent had, or "-" if it had none, to
# restore for the processes it starts in turn (they need not carry this process's BLAS).
_RELAUNCHED = "_MLX_LFM2VL_RELAUNCHED_FROM_LD_PRELOAD"


def relaunch_with_blas_preload() -> None:
    """Re-run this command line with OpenBLAS (and the gemv forwarder) preloaded, or, in the
    relaunched process, put LD_PRELOAD back as the user had it.

    For the command lines' entry points only (`python -m ...`, console scripts): it replaces the
    process. A BLAS can only be preloaded before the process starts, hence the re-exec, of
    exactly the same command (`sys.orig_argv`, interpreter options included). Nothing happens
    off Linux, if MLX already calls a system BLAS, if the system has no OpenBLAS, or with
    MLX_LFM2VL_BLAS_PRELOAD=0; without a C compiler only OpenBLAS is preloaded.
    """
    if _RELAUNCHED in os.environ:
        original = os.environ.pop(_RELAUNCHED)
        if original.startswith("="):
            os.environ["LD_PRELOAD"] = original[1:]
        else:
            os.environ.pop("LD_PRELOAD", None)
        return
    if (
        sys.platform != "linux"
        or os.environ.get("MLX_LFM2VL_BLAS_PRELOAD", "1") == "0"
        or not blas_in_use().startswith("MLX's bundled")
    ):
        return
    try:
        preload = blas_preload()
    except Lfm2VlError:
        try:
            preload = str(find_openblas())
        except Lfm2VlError:
            return  # `--verbose` names the slow BLAS, load() warns, the README says what to do
    original = os.environ.get("LD_PRELOAD")
    env = dict(os.environ, **{_RELAUNCHED: "-" if original is None else "=" + original})
    env["LD_PRELOAD"] = " ".join(filter(None, [preload, original]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
