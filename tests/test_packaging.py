"""fastkd owns the import name `fastkd` and nothing else (issue 20).

The checkout's `kernels/` and `bench/` folders are installed as `fastkd.kernels` and
`fastkd.bench`. They carry no `__init__.py`, so from the checkout root (where `python -m`,
`python -c` and pytest put the current directory first on `sys.path`) they are at most namespace
portions, and a regular package of the same name anywhere on the path wins: Hugging Face's
`kernels`, which transformers >= 5 imports, in particular.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str, **env) -> subprocess.CompletedProcess:
    """`python -c code` with the checkout root as working directory (sys.path[0] == '')."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_hf_kernels_is_not_shadowed_from_the_checkout_root():
    pytest.importorskip("transformers", reason="transformers is optional (fastkd[hf])")
    if importlib.util.find_spec("kernels") is None:
        pytest.skip("Hugging Face's `kernels` is not installed (constraints.txt installs it)")
    done = _run_from_root(
        "import transformers.integrations.hub_kernels, kernels; print(kernels.__file__)")
    assert done.returncode == 0, done.stderr[-2000:]
    location = Path(done.stdout.strip().splitlines()[-1]).resolve()
    # (.venv may live inside the checkout: what matters is that it is not our folder)
    assert (ROOT / "kernels") not in location.parents, f"`kernels` is our folder: {location}"


@pytest.mark.parametrize("name", ["kernels", "bench"])
def test_a_regular_package_of_a_folders_name_wins_over_the_folder(tmp_path, name):
    other = tmp_path / name
    other.mkdir()
    (other / "__init__.py").write_text("OWNER = 'another distribution'\n")
    done = _run_from_root(f"import {name}; print({name}.OWNER)", PYTHONPATH=str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "another distribution"


def test_no_folder_at_the_root_is_a_regular_package_but_fastkd():
    packages = sorted(p.name for p in ROOT.iterdir()
                      if p.is_dir() and not p.is_symlink() and (p / "__init__.py").exists())
    assert packages == ["fastkd"]
    modules = sorted(p.name for p in ROOT.glob("*.py"))
    assert modules == ["setup.py"], "a module at the root is importable as a top-level name"


def test_fastkd_kernels_and_bench_come_from_the_repository_folders():
    import fastkd.bench.timing
    import fastkd.kernels

    assert [Path(p).resolve() for p in fastkd.kernels.__path__] == [ROOT / "kernels"]
    assert Path(fastkd.bench.timing.__file__).resolve() == ROOT / "bench" / "timing.py"


def _editable_finder_names(path: Path) -> set[str]:
    """Module names an editable install's finder maps (its MAPPING and NAMESPACES dicts)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") in (
                "MAPPING", "NAMESPACES"):
            names |= set(ast.literal_eval(node.value))
    return names


def _top_level_names(files) -> set[str]:
    """Top-level import names a distribution's file list provides."""
    names = set()
    for file in files:
        parts = Path(str(file)).parts
        if parts[0] == ".." or parts[0].endswith((".dist-info", ".egg-info")):
            continue  # console scripts and metadata
        if parts[0] == "__pycache__" or parts[0].endswith(".pth"):
            continue
        if parts[0].startswith("__editable__") and parts[0].endswith("_finder.py"):
            names |= {n.split(".")[0] for n in _editable_finder_names(file.locate())}
            continue
        names.add(parts[0].split(".")[0])
    return names


def test_the_installed_distribution_provides_only_fastkd():
    dist = metadata.distribution("fastkd")
    assert dist.files, "fastkd's installed file list is empty"
    assert _top_level_names(dist.files) == {"fastkd"}
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:
        assert top_level.split() == ["fastkd"]


def test_a_wheel_build_holds_only_fastkd(tmp_path):
    # build_py's egg_info goes to tmp_path too: an egg-info left in the root would be found
    # first by importlib.metadata from there.
    lib, meta = tmp_path / "lib", tmp_path / "meta"
    meta.mkdir()
    done = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(meta),
                           "build_py", "--build-lib", str(lib)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in lib.iterdir()) == ["fastkd"]
    assert (lib / "fastkd" / "kernels" / "dense_kd.py").is_file()
    assert (lib / "fastkd" / "bench" / "cli.py").is_file()
    assert not list(ROOT.glob("*.egg-info"))
