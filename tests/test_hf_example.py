"""examples/hf_trainer.py runs end to end (a few steps; the full run is the README's)."""

from __future__ import annotations

import os
import runpy
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "hf_trainer.py")


def test_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [EXAMPLE, "--teacher-steps", "4", "--steps", "3",
                                      "--student-sentences", "32"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(EXAMPLE, run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # the example runs on one thread
    out = capsys.readouterr().out
    assert "teacher: eval CE" in out
    assert "labels only" in out and "with distillation" in out
