"""The CUDA path (NCCL, one rank per GPU). Skips where no GPU is visible."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.timeout(240)
def test_allreduce_on_cuda_matches_cpu(tmp_path):
    workers = min(torch.cuda.device_count(), 2)
    args = ["--model", "linear", "--steps", "100", "--lr", "0.05", "--workers", str(workers)]
    train(tmp_path / "gpu", *args, "--device", "cuda")
    train(tmp_path / "cpu", *args, "--device", "cpu")
    gpu = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    cpu = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    assert gpu["lstsq_rel_error"] == pytest.approx(cpu["lstsq_rel_error"], rel=1e-3, abs=1e-5)
