"""The loss settings type: frozen, one set of rules on every backend, derived kernel values."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastkd
from fastkd._dispatch import resolve_backend
from fastkd._kernel_args import KernelArgs
from fastkd._options import LossOptions, teacher_scale

ROOT = Path(__file__).resolve().parents[1]

BAD_SETTINGS = [
    ("temperature", dict(temperature=float("inf"))),
    ("temperature", dict(temperature=float("nan"))),
    ("temperature", dict(temperature=0.0)),
    ("temperature", dict(temperature=-1.0)),
    ("alpha", dict(alpha=1.5)),
    ("alpha", dict(alpha=float("nan"))),
    ("divergence", dict(divergence="bogus")),
    ("beta", dict(divergence="jsd", beta=1.0)),
    ("beta", dict(divergence="jsd", beta=float("nan"))),
    ("label_smoothing", dict(label_smoothing=1.5)),
    ("label_smoothing", dict(label_smoothing=float("inf"))),
    ("softcap", dict(softcap=0.0)),
    ("softcap", dict(softcap=float("inf"))),
    ("reduction", dict(reduction="avg")),
    ("num_items_in_batch", dict(num_items_in_batch=0)),
    ("num_items_in_batch", dict(num_items_in_batch=float("inf"))),
    ("skew", dict(skew=0.1)),  # only the skew divergences take it
    ("alpha_beta", dict(alpha_beta=(0.5, 0.5))),  # only divergence="alpha_beta" takes it
]


def _backends():
    names = ["torch"]
    for name in ("cpu", "triton"):
        try:
            resolve_backend(name, torch.zeros(1))
            names.append(name)
        except Exception:  # noqa: BLE001 - not available on this machine
            pass
    return names


def _inputs():
    torch.manual_seed(0)
    s = torch.randn(4, 7, requires_grad=True)
    t = torch.randn(4, 7)
    y = torch.randint(0, 7, (4,))
    return s, t, y


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("option,bad", BAD_SETTINGS, ids=lambda x: str(x))
def test_bad_setting_raises_the_same_error_on_every_backend(option, bad, backend):
    s, t, y = _inputs()
    with pytest.raises(ValueError, match=option) as dense:
        fastkd.distillation_loss(s, t, y, backend=backend, **bad)
    lp, idx = fastkd.topk_teacher_logprobs_from_logits(t, 3)
    with pytest.raises(ValueError, match=option) as sparse:
        fastkd.sparse_distillation_loss(s, lp, idx, y, backend=backend, **bad)
    assert str(dense.value) == str(sparse.value)
    if option != "num_items_in_batch":  # a call argument of the module, not a setting
        with pytest.raises(ValueError, match=option) as module:
            fastkd.DistillationLoss(backend=backend, **bad)(s, t, y)
        assert str(module.value) == str(dense.value)
    with pytest.raises(ValueError) as direct:
        LossOptions.pick(bad).validate()
    assert str(direct.value) == str(dense.value)


def test_ignore_index_must_be_an_int():
    with pytest.raises(TypeError, match="ignore_index"):
        LossOptions(ignore_index=1.5).validate()


def test_options_are_frozen_and_list_every_keyword():
    options = LossOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.temperature = 2.0
    assert LossOptions.names() == (
        "temperature", "alpha", "divergence", "beta", "skew", "alpha_beta", "scale_by_t2",
        "ignore_index", "label_smoothing", "softcap", "reduction", "num_items_in_batch")
    import inspect
    public = inspect.signature(fastkd.distillation_loss).parameters
    for name in LossOptions.names():
        assert public[name].default == getattr(options, name), name


def test_derived_kernel_values():
    options = LossOptions(temperature=2.0, alpha=0.25, divergence="jsd", beta=0.3,
                          ignore_index=-1, label_smoothing=0.1, softcap=30.0).validate()
    assert options.loss_weights(True) == (0.25, 0.75 * 4.0)
    assert options.loss_weights(False) == (0.0, 4.0)
    assert options.divergence_code == 2
    assert options.kernel_args(True) == KernelArgs(2.0, 0.25, 3.0, 2, 0.3, 0.0, -1, 0.1, 30.0)
    assert options.kernel_args(True, weight=0.5) == KernelArgs(2.0, 0.125, 1.5, 2, 0.3, 0.0, -1,
                                                               0.1, 30.0)
    unscaled = dataclasses.replace(options, scale_by_t2=False, softcap=None)
    assert unscaled.kernel_args(False) == KernelArgs(2.0, 0.0, 1.0, 2, 0.3, 0.0, -1, 0.1, 0.0)
    assert unscaled.kernel_args(False).dense_scalars() == (2.0, 0.0, 1.0, 2, 0.3, 0.0, -1,
                                                           0.1, 0.0)


def test_teacher_scale():
    assert teacher_scale(None, 2.0, "bucket") == 1.0
    assert math.isclose(teacher_scale(1.0, 2.0, "renormalize"), 0.5)
    with pytest.raises(ValueError, match="teacher_temperature"):
        teacher_scale(float("inf"), 2.0, "renormalize")
    with pytest.raises(ValueError, match="renormalize"):
        teacher_scale(1.0, 2.0, "bucket")


def test_integration_uses_core_validation():
    # importorskip on the module itself: transformers may be absent or shadowed
    hf = pytest.importorskip("fastkd.integrations.transformers", exc_type=ImportError)
    DistillationArguments = hf.DistillationArguments

    for option, bad in BAD_SETTINGS:
        if option in ("reduction", "num_items_in_batch", "softcap", "skew", "alpha_beta"):
            continue  # not DistillationArguments fields
        with pytest.raises(ValueError) as core:
            LossOptions.pick(bad).validate()
        with pytest.raises(ValueError) as args:
            DistillationArguments(output_dir="/tmp/fastkd-options-test", **bad)
        assert str(args.value) == str(core.value), option
    # the core's rule, not a stricter copy: label_smoothing=1 is allowed everywhere
    DistillationArguments(output_dir="/tmp/fastkd-options-test", label_smoothing=1.0)
    # its loss fields (written out for HfArgumentParser) default as LossOptions' do
    arguments = DistillationArguments(output_dir="/tmp/fastkd-options-test")
    shared = [name for name in LossOptions.names() if hasattr(arguments, name)]
    assert len(shared) >= 6, shared
    for name in shared:
        assert getattr(arguments, name) == getattr(LossOptions(), name), name


def test_public_keyword_lists_come_from_the_option_fields():
    """Every entry point shows the option fields as keyword-only arguments with the fields'
    defaults (takes_options), the top-k ones with tail and teacher_temperature too; an
    unknown keyword raises TypeError."""
    import inspect

    from fastkd import distributed
    from fastkd._options import TopKOptions

    dense = [fastkd.distillation_loss, fastkd.fused_linear_distillation_loss,
             distributed.vocab_parallel_distillation_loss,
             distributed.vocab_parallel_fused_linear_distillation_loss,
             fastkd.DistillationLoss, fastkd.FusedLinearDistillationLoss]
    topk = [fastkd.sparse_distillation_loss, fastkd.fused_linear_sparse_distillation_loss,
            distributed.vocab_parallel_sparse_distillation_loss, fastkd.SparseDistillationLoss]
    for entries, options in ((dense, LossOptions()), (topk, TopKOptions())):
        for entry in entries:
            params = inspect.signature(entry).parameters
            assert "options" not in params, entry
            for name in options.names():
                assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, (entry, name)
                assert params[name].default == getattr(options, name), (entry, name)
    s, t, y = _inputs()
    with pytest.raises(TypeError, match="temprature"):
        fastkd.distillation_loss(s, t, y, temprature=2.0)


CORE_MODULES = ["fastkd._options", "fastkd._kernel_args", "fastkd._validation",
                "fastkd._reduction", "fastkd._inputs", "fastkd._lm_head", "fastkd._dispatch",
                "fastkd._topk_losses", "fastkd.functional", "fastkd.modules", "fastkd.losses",
                "fastkd._dtensor", "fastkd.distributed"]


def _imported_modules(path):
    """Every module name a source file imports (at any depth, lazy imports included),
    relative imports resolved against the fastkd package."""
    import ast
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_the_dtensor_routing_module_is_not_imported_back():
    """fastkd._dtensor imports the public functions; only the package's __init__ imports
    it (to register the routes), and functional.py never reaches fastkd.distributed."""
    importers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "fastkd").rglob("*.py")
                       if "fastkd._dtensor" in _imported_modules(p))
    assert importers == ["fastkd/__init__.py"], importers
    functional = _imported_modules(ROOT / "fastkd" / "functional.py")
    assert "fastkd.distributed" not in functional and "fastkd._dtensor" not in functional


@pytest.mark.parametrize("module", CORE_MODULES)
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    """An import cycle shows up as an ImportError when a module in it is imported first."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, env=env,
                   timeout=120)
