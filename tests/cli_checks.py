"""What the command-line tests share: the checkout's environment, one-line error checks, and
runs of several processes under `mlx.launch`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from mlx_lfm2vl.shapes.build import free_ports

REPO = Path(__file__).resolve().parents[1]


def environment(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout's package first on the path, whatever the
    working directory (and under mlx.launch)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A failed run that printed nothing on stdout and one `error: ...` line (no traceback) on
    stderr, containing each needle."""
    assert result.returncode != 0
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def launch(module: str, processes: int, *args: object) -> subprocess.CompletedProcess:
    """`python -m module args` in `processes` processes under `mlx.launch` on 127.0.0.1."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    command = [str(launcher), "-n", str(processes), "-p", str(free_ports(processes)), "--"]
    command += [sys.executable, "-m", module, *map(str, args)]
    # One BLAS thread each: two processes on a 2-core machine otherwise spin against each other.
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(OPENBLAS_NUM_THREADS="1"),
        cwd=REPO,
        start_new_session=True,  # on a timeout, the ranks go with the launcher
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
