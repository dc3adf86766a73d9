"""The `make demo` experiment: its building blocks, and a quick end-to-end run of main."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from fastkd._dispatch import unavailable_reason
from fastkd.demo import cli, digits

LAST_LINE = re.compile(r"teacher_acc=(\d\.\d{4}) student_acc=(\d\.\d{4}) "
                       r"student_kd_acc=(\d\.\d{4})")


def test_quick_main_prints_the_summary_line_last(capsys):
    assert cli.main(["--quick", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and not out.endswith("\n\n"), "nothing may follow the line"
    last = out.splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match, f"bad last line: {last!r}"
    for value in match.groups():
        assert 0.0 <= float(value) <= 1.0
    assert len(re.findall(r"^seed \d+: ", out, flags=re.M)) == 3  # quick = 3 seeds


def test_progress_bar_goes_to_stderr_not_stdout(capsys):
    cli.main(["--quick", "--seeds", "1", "--epochs", "1"])
    captured = capsys.readouterr()
    assert "seed 0 teacher" in captured.err
    assert "it/s" not in captured.out and "%|" not in captured.out


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--epochs", "0"],
                                  ["--labels-per-class", "-1"]])
def test_bad_options_are_rejected(argv):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)


def test_labels_per_class_zero_means_every_label():
    assert cli.parse_args(["--labels-per-class", "0"]).labelled_per_class is None
    assert cli.parse_args([]).labelled_per_class == digits.DemoConfig.labelled_per_class


def test_split_is_stratified_disjoint_and_seed_determined():
    x, y = digits.load_digits_tensors()
    assert x.shape == (1797, 64) and y.shape == (1797,)
    config = digits.DemoConfig()
    first, again, other = (digits.make_split(x, y, config, s) for s in (0, 0, 1))
    assert torch.equal(first.x_train, again.x_train) and torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.x_train, other.x_train)
    assert len(first.x_train) + len(first.x_test) == 1797
    rest, picked = digits.stratified_split(y, 0.3, torch.Generator().manual_seed(0))
    assert sorted(torch.cat([rest, picked]).tolist()) == list(range(1797))  # disjoint, covering
    for label in range(10):
        share = float((first.y_test == label).sum()) / float((y == label).sum())
        assert abs(share - config.test_fraction) < 0.01
    # standardised with training statistics
    assert first.x_train.mean(0).abs().max() < 1e-4


def test_students_see_exactly_the_allowed_labels():
    x, y = digits.load_digits_tensors()
    config = replace(digits.DemoConfig(), labelled_per_class=7)
    split = digits.make_split(x, y, config, seed=3)
    visible = split.y_students != digits.UNLABELLED
    assert torch.equal(split.y_students[visible], split.y_train[visible])
    assert torch.bincount(split.y_students[visible], minlength=10).tolist() == [7] * 10
    every = digits.make_split(x, y, replace(config, labelled_per_class=None), seed=3)
    assert torch.equal(every.y_students, every.y_train)


def test_student_methods_share_their_initialisation():
    widths = digits.DemoConfig().student_widths
    a = digits.build_mlp(widths, digits.model_seed(4, "student"))
    b = digits.build_mlp(widths, digits.model_seed(4, "student"))
    c = digits.build_mlp(widths, digits.model_seed(5, "student"))
    assert [p.shape[::-1] for p in a.parameters() if p.dim() == 2] == [(64, 16), (16, 10)]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, c[0].weight)
    assert digits.model_seed(1, "teacher") != digits.model_seed(1, "student")


def textbook_hinton_loss(student, teacher, labels, temperature, alpha):
    """float64 mean over rows of alpha*CE + (1-alpha)*T^2*KL(p_t||p_s); the soft term alone
    on rows labelled UNLABELLED."""
    s, t = student.double(), teacher.double()
    log_p_s = torch.log_softmax(s / temperature, -1)
    log_p_t = torch.log_softmax(t / temperature, -1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    labelled = labels != digits.UNLABELLED
    ce = -torch.log_softmax(s, -1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    rows = (1 - alpha) * temperature**2 * kl + alpha * torch.where(labelled, ce, 0.0)
    return rows.mean()


CPU_BACKENDS = ("torch", "cpu")  # what `auto` may pick for the demo's float32 CPU tensors


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("unlabelled_fraction", [0.0, 0.6, 1.0])
def test_hinton_loss_matches_the_textbook_formula(unlabelled_fraction, backend, monkeypatch):
    reason = unavailable_reason(backend, torch.device("cpu"), torch.float32)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable here: {reason}")
    monkeypatch.setenv("FASTKD_BACKEND", backend)  # the demo's losses use backend="auto"
    generator = torch.Generator().manual_seed(11)
    n, classes = 48, 10
    student = (3 * torch.randn(n, classes, generator=generator)).requires_grad_()
    teacher = 3 * torch.randn(n, classes, generator=generator)
    labels = torch.randint(0, classes, (n,), generator=generator)
    labels[: int(unlabelled_fraction * n)] = digits.UNLABELLED
    config = replace(digits.DemoConfig(), temperature=4.0, alpha=0.1)

    loss = digits.hinton_loss(config)(nn.Identity(), (student, labels, teacher))
    loss.backward()
    oracle_student = student.detach().double().requires_grad_()
    expected = textbook_hinton_loss(oracle_student, teacher, labels, 4.0, 0.1)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(student.grad.double(), oracle_student.grad, rtol=1e-5,
                               atol=1e-7)


def test_train_fits_a_small_labelled_set():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=generator)
    y = torch.randint(0, 10, (40,), generator=generator)
    config = replace(digits.DemoConfig(), progress=False, batch_size=8)
    model = digits.build_mlp((64, 32, 10), seed=0)
    before = digits.accuracy(model, x, y)
    digits.train(model, (x, y), digits.cross_entropy_loss, config, steps=300, seed=0, desc="t")
    after = digits.accuracy(model, x, y)
    assert after == 1.0 and before < 0.5


def test_batches_cover_every_row_each_pass():
    generator = torch.Generator().manual_seed(0)
    chunks = list(digits.batches(10, 4, steps=6, generator=generator))
    assert [len(c) for c in chunks] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(chunks[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(chunks[3:]).tolist()) == list(range(10))


def test_summary_statistics_and_last_line():
    per_seed = [{"teacher": 0.9, "student": 0.5, "student_kd": 0.7},
                {"teacher": 1.0, "student": 0.7, "student_kd": 0.6}]
    s = cli.summarise([0.5, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1414213562)
    assert (s["min"], s["max"]) == (0.5, 0.7)
    lines = cli.format_summary(per_seed)
    assert lines[-1] == "teacher_acc=0.9500 student_acc=0.6000 student_kd_acc=0.6500"
    assert "student_kd - student: mean +0.0500, better on 1/2 seeds" in lines


DEMO_DIR = Path(digits.__file__).parent


def _demo_imports(path: Path) -> set:
    """The fastkd.demo modules (by short name, "" for the package) that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                names = [module] if module else [alias.name for alias in node.names]
            elif node.level == 0 and module.startswith("fastkd.demo"):
                rest = module[len("fastkd.demo"):].lstrip(".")
                names = [rest] if rest else [alias.name for alias in node.names]
            else:
                continue
            found.update(names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastkd.demo"):
                    found.add(alias.name[len("fastkd.demo"):].lstrip("."))
    return found


def test_demo_is_a_package_without_import_cycles():
    modules = {p.stem: p for p in DEMO_DIR.glob("*.py")}
    assert set(modules) == {"__init__", "__main__", "cli", "digits", "methods", "deploy"}
    assert not list(DEMO_DIR.parent.glob("demo_*.py")), "the old flat modules are gone"
    graph = {name: _demo_imports(path) - {name} for name, path in modules.items()}
    assert graph["digits"] == set() and graph["deploy"] == set()
    assert graph["methods"] == {"digits"}
    assert graph["cli"] == {"digits", "methods", "deploy"}
    # nothing but the entry points reaches the package or the cli module
    for name, imported in graph.items():
        if name not in ("__init__", "__main__"):
            assert not imported & {"", "cli", "__init__"}, name


def test_each_demo_module_can_be_imported_first():
    """A cycle shows when the module inside it is imported first: import each one first, in
    one fresh interpreter, with the demo modules dropped from sys.modules in between."""
    code = (
        "import importlib, sys\n"
        "for name in ('digits', 'methods', 'deploy', 'cli', '__main__'):\n"
        "    for key in [k for k in sys.modules if k.startswith('fastkd.demo')]:\n"
        "        del sys.modules[key]\n"
        "    module = importlib.import_module('fastkd.demo.' + name)\n"
        "    print(module.__name__)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"fastkd.demo.{m}" for m in
                                   ("digits", "methods", "deploy", "cli", "__main__")]


def test_fastkd_demo_help_through_the_console_entry_point():
    done = subprocess.run([sys.executable, "-m", "fastkd", "demo", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fastkd demo")
    assert "--method" in done.stdout and "--quick" in done.stdout
