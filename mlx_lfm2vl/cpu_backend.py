"""Process settings for MLX's CPU backend on Linux.

Two of them, both process-wide: glibc malloc tuning (below, applied by `load()`) and a BLAS preload
line (`blas_preload`, printed by `python -m mlx_lfm2vl.cpu_backend`), which must be set before the
process starts and so is the user's to apply.

MLX's CPU allocator keeps no cache of freed buffers: every large temporary (an attention score
matrix, an MLP activation) is a fresh `malloc`, which glibc serves with a fresh `mmap` above its
mmap threshold (at most 32 MiB, 128 KiB to start), so the kernel must page-fault every 4 KiB page
of it in again. Measured here, that costs ~0.6 ms per MiB: multiplying a 48 MiB array by 2 takes
31 ms, of which 28 ms are page faults. Raising glibc's mmap and trim thresholds makes freed
memory stay with the process and be reused (the same multiply: 3.5 ms).

The price: the process keeps up to `_TRIM_THRESHOLD` of freed memory instead of returning it to
the system at once. `load()` applies this when the model computes on the CPU; set
MLX_LFM2VL_KEEP_FREED_MEMORY=0 to leave the allocator alone. It is process-wide, so other MLX
code in the same process (another library's model) benefits too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import Lfm2VlError

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Larger than any temporary of these models (the biggest are attention scores, ~60 MiB per
# block of queries), smaller than the largest weights, which should go back when unloaded.
_MMAP_THRESHOLD = 256 << 20
_TRIM_THRESHOLD = 512 << 20


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Tune glibc malloc as described above; True if it took effect (Linux with glibc only)."""
    if os.environ.get("MLX_LFM2VL_KEEP_FREED_MEMORY", "1") == "0" or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # One arena: MLX allocates on its stream threads, and a thread's own arena lives in 64 MiB
    # heaps that cannot hold these buffers, so glibc would mmap them whatever the threshold.
    settings = [
        (_M_ARENA_MAX, 1),
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
    ]
    return all([mallopt(option, value) for option, value in settings])


# ---------------------------------------------------------------- BLAS preload

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
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise Lfm2VlError(
            "no C compiler found to build the gemv forwarder: install one "
            "(Debian/Ubuntu: apt-get install gcc) or set CC"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=cache_dir, suffix=".so.partial")
    os.close(handle)
    command = [compiler, "-O2", "-shared", "-fPIC", "-pthread", "-o", partial]
    command.append(str(_GEMV_FORWARD_SOURCE))
    try:
        try:
            result = subprocess.run(command + ["-ldl"], capture_output=True, text=True)
        except OSError as error:
            raise Lfm2VlError(
                f"cannot run the C compiler {compiler!r} ({error}): set CC"
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


@lru_cache(maxsize=1)
def bf16_product_tag() -> float | None:
    """The alpha that asks the preloaded gemv forwarder for a product of bf16 weights in float32
    arithmetic (native/gemv_forward.c, "bf16 weights"), or None if this process has no
    forwarder that knows it (or it has no fast kernel for this CPU): then the tag must never be
    sent, a plain BLAS would multiply bit patterns. Also None with MLX_LFM2VL_BF16_WEIGHTS=0
    (keep weights in the compute dtype)."""
    if sys.platform != "linux" or os.environ.get("MLX_LFM2VL_BF16_WEIGHTS", "1") == "0":
        return None
    try:
        tag = ctypes.CDLL(None).gemv_forward_bf16_tag  # a preloaded library's global symbol
    except (OSError, AttributeError):
        return None
    tag.restype = ctypes.c_float
    return tag() or None  # 0: the forwarder has no fast kernel for this CPU


def blas_in_use() -> str:
    """Which BLAS this process's MLX calls, for `--verbose` and benchmark headers."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: MLX uses Accelerate (macOS) or its bundled BLAS
        return "platform default"
    fields = (line.split() for line in maps.splitlines())
    names = {Path(f[-1]).name for f in fields if len(f) >= 6 and f[-1].startswith("/")}
    openblas = sorted(name for name in names if name.startswith("libopenblas"))
    if not openblas:
        return "MLX's bundled reference BLAS (slow: see README, 'Compute dtype')"
    forwarder = any(name.startswith("libgemv_forward-") for name in names)
    return f"{openblas[0]}" + (" with the gemv forwarder" if forwarder else "")


def slow_blas_warning() -> str | None:
    """What to tell a user whose MLX runs float32 matmuls on its bundled reference BLAS."""
    if sys.platform != "linux" or not blas_in_use().startswith("MLX's bundled"):
        return None
    return (
        "MLX is using its bundled reference BLAS, which makes float32 matmuls ~50x slower: "
        "install OpenBLAS (apt-get install libopenblas0-pthread) and start Python with "
        'LD_PRELOAD="$(python -m mlx_lfm2vl.cpu_backend)"'
    )


_RELAUNCHED = "_MLX_LFM2VL_RELAUNCHED"


def relaunch_with_blas_preload(module: str, argv: list[str]) -> None:
    """Re-run `python -m module argv` with OpenBLAS (and the gemv forwarder) preloaded.

    For the command lines, on Linux only: MLX's CPU wheel otherwise runs float32 matmuls on its
    bundled reference BLAS, ~50x slower. A BLAS can only be preloaded before the process starts,
    hence the re-exec. Nothing happens if OpenBLAS is already loaded, if the system has none, or
    with MLX_LFM2VL_BLAS_PRELOAD=0; without a C compiler only OpenBLAS is preloaded.
    """
    if (
        sys.platform != "linux"
        or os.environ.get("MLX_LFM2VL_BLAS_PRELOAD", "1") == "0"
        or os.environ.get(_RELAUNCHED)
        or blas_in_use().startswith("libopenblas")
    ):
        return
    try:
        preload = blas_preload()
    except Lfm2VlError:
        try:
            preload = str(find_openblas())
        except Lfm2VlError:
            return  # `--verbose` names the slow BLAS and the README says what to install
    env = dict(os.environ, **{_RELAUNCHED: "1"})
    env["LD_PRELOAD"] = " ".join(filter(None, [preload, os.environ.get("LD_PRELOAD")]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def main(argv: list[str] | None = None) -> int:
    """Print the preload line: export LD_PRELOAD="$(python -m mlx_lfm2vl.cpu_backend)"."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(
            "usage: python -m mlx_lfm2vl.cpu_backend  (prints an LD_PRELOAD value)",
            file=sys.stderr,
        )
        return 2
    try:
        print(blas_preload())
    except Lfm2VlError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # The package's copy of this module (imported by `mlx_lfm2vl/__init__`), as in generate.py.
    from mlx_lfm2vl.cpu_backend import main as package_main

    sys.exit(package_main())
