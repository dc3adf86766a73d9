"""Data parallel (2 processes, gloo, CPU) equals one process on the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args, out):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out)


def test_two_gloo_processes_equal_one_process(tmp_path):
    script = os.path.join(HERE, "hf_ddp_worker.py")
    ddp = worker(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                  "127.0.0.1", "--master_port", str(free_port()), script,
                  str(tmp_path / "ddp.pt"), "2"], tmp_path / "ddp.pt")
    assert ddp["world"] == 2
    single = worker([script, str(tmp_path / "one.pt"), "4"], tmp_path / "one.pt")
    assert single["world"] == 1
    assert ddp["log"]["loss"] == pytest.approx(single["log"]["loss"], rel=1e-5)
    for key in ("ce", "kd"):
        if key in single["log"]:
            assert ddp["log"][key] == pytest.approx(single["log"][key], rel=1e-5)
    for name, step in single["step"].items():
        scale = step.abs().max().item()
        assert scale > 0, name
        assert (ddp["step"][name] - step).abs().max().item() <= 1e-4 * scale, name
