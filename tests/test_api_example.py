"""The Python API through the example script, under plain torchrun."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, max_abs_diff, shoal_env

pytestmark = pytest.mark.slow  # trains through the launcher: not in the quick tier


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """The example under torchrun with ``nproc`` workers; 0: as a plain script, one
    process without torchrun."""
    script = REPO / "examples" / "torchrun_digits.py"
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [str(script), *args]
    proc = subprocess.run(cmd, env=shoal_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.timeout(240)
def test_example_under_torchrun_matches_one_process(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    torchrun(0, "--steps", "150", "--out", str(one))  # (one process, no torchrun needed)
    proc = torchrun(2, "--steps", "150", "--out", str(two))
    accuracy = float(re.search(r"accuracy (\S+)", proc.stdout).group(1))
    sent = int(re.search(r"bytes sent ([\d,]+)", proc.stdout).group(1).replace(",", ""))
    assert accuracy > 0.95
    num_params = 64 * 128 + 128 + 128 * 10 + 10
    assert sent == 150 * num_params * 4  # ring all-reduce, 2 ranks: the whole buffer each way
    a = torch.load(one, weights_only=True)
    b = torch.load(two, weights_only=True)
    assert max_abs_diff(a, b) < 1e-4
