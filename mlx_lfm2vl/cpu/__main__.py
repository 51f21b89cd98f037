"""`python -m mlx_lfm2vl.cpu`: print the LD_PRELOAD value for MLX's CPU backend on Linux.

    export LD_PRELOAD="$(python -m mlx_lfm2vl.cpu)"

OpenBLAS behind the port's gemv forwarder (see `blas.py`); built once into ~/.cache/mlx_lfm2vl.
"""

import sys

from ..errors import Lfm2VlError
from .blas import blas_preload


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args:
        print(
            'usage: export LD_PRELOAD="$(python -m mlx_lfm2vl.cpu)"  (prints an LD_PRELOAD value)',
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
    sys.exit(main())
