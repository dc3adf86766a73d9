"""examples/tensor_parallel.py under torchrun with 2 gloo ranks on CPU (DTensor logits
mode; the --fused mode's DTensor route is covered in tests/test_distributed.py, and each
torchrun start costs ~20 s here). The script itself asserts that the tensor-parallel loss
equals the single-process loss at every step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the example builds a Llama with transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_tensor_parallel_example(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", str(ROOT / "examples" / "tensor_parallel.py"),
           "--steps", "2"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "OK: the losses agree" in run.stdout, run.stdout[-3000:]
    assert run.stdout.count("tensor-parallel loss") == 2
