"""Set-up shared by the Triton kernel test files: where the kernels run, the module marks,
and the one-case-per-divergence parameter list."""

from __future__ import annotations

import os

import pytest
import torch
from kernel_checks import DIVERGENCE_CASES

#: Under TRITON_INTERPRET=1 the kernels run on CPU tensors (small shapes); otherwise on CUDA.
ON_CPU = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
needs_device = pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                                  reason="needs CUDA or TRITON_INTERPRET=1")


def module_marks() -> list:
    """`pytestmark` of a Triton test file: a device to run on, and no numpy warnings from
    the interpreter about inf - inf / overflow in lanes the kernels compute and then
    discard (masked columns, ignored rows); other warnings stay visible."""
    return [needs_device,
            pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")]


#: One case per divergence, for the tests that multiply parameters.
DIVERGENCE_FOUR = DIVERGENCE_CASES[:3] + DIVERGENCE_CASES[4:]
FOUR_IDS = ["kl", "reverse_kl", "jsd", "tvd"]
