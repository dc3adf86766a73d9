"""`fastkd demo --method ...` and the int8 deployment check: building blocks, every method's
wiring (init, data, steps, a loss that reaches the student), and quick end-to-end runs."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch
from torch import nn

from fastkd.demo import cli, deploy, digits, methods

FLOAT = r"(\d\.\d{4})"


def tiny_config(**changes) -> digits.DemoConfig:
    return replace(digits.DemoConfig(), progress=False, **changes)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as `cli.main` uses: the models are tiny, and on this shared
    2-core machine a second OpenMP thread spends its time waiting at barriers."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits_split():
    x, y = digits.load_digits_tensors()
    return digits.make_split(x, y, tiny_config(), seed=0)


# ----------------------------------------------------------------------------- features


def test_penultimate_and_logits_give_hidden_features_and_the_same_logits():
    config = digits.DemoConfig()
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    for widths, hidden_width in ((config.student_widths, 16), (config.teacher_widths, 256)):
        model = digits.build_mlp(widths, seed=3)
        hidden, logits = methods.penultimate_and_logits(model, x)
        assert hidden.shape == (37, hidden_width) and logits.shape == (37, 10)
        assert (hidden >= 0).all(), "features are taken after the last hidden ReLU"
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
        torch.testing.assert_close(logits, model[-1](hidden), rtol=0, atol=0)
    hidden.sum().backward()
    assert model[0].weight.grad is not None, "features must carry gradients for the student"


def test_penultimate_and_logits_rejects_other_models():
    with pytest.raises(TypeError, match="model"):
        methods.penultimate_and_logits(nn.Linear(64, 10), torch.randn(2, 64))


def test_frozen_outputs_are_constants_in_eval_mode():
    teacher = digits.build_mlp(digits.DemoConfig().teacher_widths, seed=1).train()
    hidden, logits = methods.frozen_outputs(teacher, torch.randn(5, 64))
    assert not hidden.requires_grad and not logits.requires_grad
    assert not teacher.training


# ----------------------------------------------------------------------------- options


def test_method_list_parsing():
    assert methods.parse_method_list("dkd, hint,dkd") == ("dkd", "hint")
    assert methods.parse_method_list("all") == tuple(methods.METHODS)
    with pytest.raises(ValueError, match="unknown --method nope"):
        methods.parse_method_list("dkd,nope")
    with pytest.raises(ValueError, match="at least one"):
        methods.parse_method_list(" , ")
    assert cli.parse_args(["--method", "rkd,sp"]).methods == ("rkd", "sp")
    assert cli.parse_args([]).methods == ()
    with pytest.raises(SystemExit):
        cli.parse_args(["--method", "bogus"])


def test_families_cover_response_feature_and_relation():
    families = {m.family for m in methods.METHODS.values()}
    assert {"response", "feature", "relation"} <= families


def test_chosen_methods_keep_the_headline_first():
    config = tiny_config(methods=("hint", "response", "multi"))
    chosen, headline = cli.chosen_methods(config)
    assert list(chosen) == ["student", "student_kd", "hint", "multi"]
    assert headline == ("teacher", "student", "student_kd", "hint", "multi")
    assert cli.chosen_methods(tiny_config()) == (cli.STUDENT_METHODS, digits.HEADLINE)


def test_model_seeds_of_every_role_differ():
    roles = ("teacher", "student", "peer", "teacher_b", "teacher_c")
    assert len({digits.model_seed(2, role) for role in roles}) == len(roles)


# ----------------------------------------------------------------------------- method wiring


class RecordedTrain:
    """Stands in for `digits.train`: records what a runner asks for, takes one real gradient
    step's worth of checks (finite scalar loss, gradient reaching the student), no training."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, data, loss_fn, config, steps, seed, desc, after_step=None):
        student = model.student if isinstance(model, methods.Trainee) else model
        batch = tuple(t[:8] for t in data)
        loss = loss_fn(model, batch)
        assert loss.dim() == 0 and torch.isfinite(loss), desc
        loss.backward()
        student_grad = student[0].weight.grad
        self.calls.append(dict(desc=desc, steps=steps, seed=seed, rows=len(data[0]),
                               first_weight=student[0].weight.detach().clone(),
                               grad_norm=0.0 if student_grad is None
                               else float(student_grad.norm()),
                               params=sum(p.numel() for p in model.parameters())))
        if after_step is not None:
            after_step()
        return model


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_method_starts_from_the_student_init_on_the_labelled_rows(
        name, digits_split, monkeypatch):
    recorder = RecordedTrain()
    monkeypatch.setattr(methods, "train", recorder)
    monkeypatch.setattr(digits, "train", recorder)
    config, seed = tiny_config(), 0
    teacher = digits.build_mlp(config.teacher_widths, digits.model_seed(seed, "teacher"))
    teacher.requires_grad_(False)

    output = methods.METHODS[name].runner(digits_split, config, seed, teacher)

    row = methods.METHODS[name].row
    models = output if isinstance(output, dict) else {row: output}
    assert set(models) == ({row, "teacher_b", "teacher_c"} if name == "multi" else {row})
    student_call = recorder.calls[-1]   # multi trains its extra teachers first
    assert student_call["rows"] == 100, "the students see the 10 x 10 labelled rows only"
    assert student_call["steps"] == digits.steps_for(config, digits_split)
    assert student_call["seed"] == seed
    init = digits.build_mlp(config.student_widths, digits.model_seed(seed, "student"))
    assert torch.equal(student_call["first_weight"], init[0].weight)
    assert student_call["grad_norm"] > 0, "the loss must reach the student's weights"
    assert [p.shape for p in models[row].parameters()] == [p.shape for p in init.parameters()]


def test_learnable_helpers_are_optimised_with_the_student(digits_split, monkeypatch):
    recorder = RecordedTrain()
    monkeypatch.setattr(methods, "train", recorder)
    teacher = digits.build_mlp(digits.DemoConfig().teacher_widths, seed=1).requires_grad_(False)
    student_params = 64 * 16 + 16 + 16 * 10 + 10
    expected_extra = {"hint": 16 * 256 + 256,      # linear regressor with bias
                      "hidden": 16 * 256,          # projection without bias
                      "rkd": 0, "sp": 0,
                      "mutual": student_params}    # the peer
    for name, extra in expected_extra.items():
        methods.METHODS[name].runner(digits_split, tiny_config(), 0, teacher)
        assert recorder.calls[-1]["params"] == student_params + extra, name


def test_train_calls_after_step_once_per_step():
    calls = []
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 10
    digits.train(digits.build_mlp((64, 8, 10), 0), (x, y), digits.cross_entropy_loss, tiny_config(),
               steps=7, seed=0, desc="t", after_step=lambda: calls.append(1))
    assert len(calls) == 7


def test_ema_teacher_follows_the_student_during_training(digits_split):
    config = tiny_config(epochs=1)
    student = methods.run_ema(digits_split, config, 0, teacher=None)
    init = digits.build_mlp(config.student_widths, digits.model_seed(0, "student"))
    assert not torch.equal(student[0].weight, init[0].weight)


# ----------------------------------------------------------------------------- int8 student


@pytest.fixture(scope="module")
def trained_student(digits_split):
    model = digits.build_mlp(digits.DemoConfig().student_widths, seed=5)
    rows = digits.labelled_rows(digits_split)
    data = (digits_split.x_train[rows], digits_split.y_students[rows])
    return digits.train(model, data, digits.cross_entropy_loss, tiny_config(), steps=300, seed=0,
                      desc="t")


def test_int8_copy_replaces_every_linear_and_leaves_the_float_model(trained_student):
    before = [p.clone() for p in trained_student.parameters()]
    quantised = deploy.quantize_int8(trained_student)
    layers = [type(m).__module__ for m in quantised]
    assert [m.startswith("torch.ao.nn.quantized.dynamic") for m in layers] == [True, False, True]
    assert quantised[0].weight().dtype == torch.qint8
    assert all(torch.equal(a, b) for a, b in zip(before, trained_student.parameters()))
    assert all(isinstance(m, nn.Linear) for m in trained_student if not isinstance(m, nn.ReLU))


def test_int8_student_predicts_like_the_float_one_and_is_smaller(trained_student, digits_split):
    x, y = digits_split.x_test, digits_split.y_test
    quantised = deploy.quantize_int8(trained_student)
    float_logits = digits.predict_logits(trained_student, x)
    int8_logits = digits.predict_logits(quantised, x)
    # int8 weights (per-tensor scale max|w|/127) and uint8 activations perturb the logits by
    # about a percent of their range; only rows with a near-tie between two classes flip.
    scale = float(float_logits.abs().max())
    assert float((int8_logits - float_logits).abs().max()) < 0.1 * scale
    agreement = float((int8_logits.argmax(-1) == float_logits.argmax(-1)).float().mean())
    assert agreement >= 0.95
    float_acc = digits.accuracy(trained_student, x, y)
    assert float_acc > 0.6, "the fixture must be a real classifier for the check to mean much"
    assert digits.accuracy(quantised, x, y) >= float_acc - 0.1
    assert deploy.serialized_bytes(quantised) < deploy.serialized_bytes(
        trained_student)


def test_serialized_bytes_and_latency():
    small, big = nn.Linear(8, 4), nn.Linear(80, 40)
    assert deploy.serialized_bytes(small) < deploy.serialized_bytes(big)
    assert deploy.serialized_bytes(big) > 4 * (80 * 40 + 40)  # float32 data + framing
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        samples = deploy.latency_samples_s(big, torch.randn(16, 80), repeats=5, warmup=1)
        assert torch.get_num_threads() == 2, "thread count restored"
    finally:
        torch.set_num_threads(threads)
    assert len(samples) == 5 and min(samples) > 0
    stats = deploy.deployment_stats(big, torch.randn(16, 80), repeats=3)
    assert stats["best_latency_s"] <= stats["latency_s"] and stats["batch_rows"] == 16
    with pytest.raises(ValueError, match="repeats"):
        deploy.median_latency_s(big, torch.randn(16, 80), repeats=0)


def test_deployment_and_summary_formatting():
    def stats(latency_s):
        return {"student_kd": {"bytes": 7069.0, "latency_s": 1e-4, "best_latency_s": 5e-5,
                               "batch_rows": 539.0},
                "student_kd_int8": {"bytes": 4877.0, "latency_s": latency_s,
                                    "best_latency_s": 0.5 * latency_s, "batch_rows": 539.0}}

    table = deploy.format_deployment([stats(2e-4), stats(4e-4), stats(3e-4)])
    assert "batch of 539 test rows" in table[0]
    assert table[-1].split() == ["student_kd_int8", "4877", "300.0", "[", "200.0,", "400.0]",
                                 "100.0"]
    per_seed = [{"teacher": 0.9, "student": 0.5, "student_kd": 0.7, "student_kd_int8": 0.7,
                 "hint": 0.6, "teacher_b": 0.95},
                {"teacher": 1.0, "student": 0.7, "student_kd": 0.6, "student_kd_int8": 0.5,
                 "hint": 0.8, "teacher_b": 0.85}]
    lines = cli.format_summary(per_seed, headline=digits.HEADLINE + ("hint",),
                                before_last=table)
    assert lines[-1] == ("teacher_acc=0.9500 student_acc=0.6000 student_kd_acc=0.6500 "
                         "hint_acc=0.7000")
    assert lines[-len(table) - 1:-1] == table
    assert "student_kd_int8 - student_kd: mean -0.0500, min -0.1000, max +0.0000, " \
           "equal on 1/2 seeds" in lines
    assert not any(line.startswith("teacher_b - ") for line in lines), "teachers: no gains"


# ----------------------------------------------------------------------------- end to end

def test_quick_method_run_prints_every_row_and_the_extended_last_line(capsys):
    assert cli.main(["--quick", "--seeds", "1", "--no-progress", "--method", "hint,rkd"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and not out.endswith("\n\n")
    lines = out.splitlines()
    last = re.fullmatch(rf"teacher_acc={FLOAT} student_acc={FLOAT} student_kd_acc={FLOAT} "
                        rf"hint_acc={FLOAT} rkd_acc={FLOAT}", lines[-1])
    assert last, f"bad last line: {lines[-1]!r}"
    assert all(0.0 <= float(v) <= 1.0 for v in last.groups())
    assert "hint [feature] -> row hint: CE + 100 * FitNets hint" in out
    assert "rkd [relation]" in out
    for row in ("hint", "rkd", "student_kd_int8"):
        assert re.search(rf"^{row} +{FLOAT} ", out, flags=re.M), row
    assert "student_kd_unlabelled" not in out
    deployment = lines.index(next(line for line in lines if line.startswith("deployment")))
    assert lines[deployment + 1].split()[:3] == ["model", "bytes", "latency_us"]
    sizes = {line.split()[0]: int(line.split()[1]) for line in lines[deployment + 2:-1]}
    assert list(sizes) == ["teacher", "teacher_int8", "student_kd", "student_kd_int8"]
    assert sizes["student_kd_int8"] < sizes["student_kd"] < sizes["teacher_int8"]
    # The quick (3-epoch) student is weak, so compare int8 with float on that same model.
    seed_line = next(line for line in lines if line.startswith("seed 0: "))
    acc = dict(field.split("=") for field in seed_line[len("seed 0: "):].split())
    assert abs(float(acc["student_kd_int8"]) - float(acc["student_kd"])) <= 0.1


def test_default_quick_run_keeps_the_exact_last_line_and_adds_the_int8_rows(capsys):
    assert cli.main(["--quick", "--seeds", "1", "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"teacher_acc={FLOAT} student_acc={FLOAT} student_kd_acc={FLOAT}",
                        lines[-1])
    assert any(line.startswith("student_kd_unlabelled ") for line in lines)
    assert any(line.startswith("student_kd_int8 ") for line in lines)
    assert lines[-2].startswith("student_kd_int8 "), "the deployment table ends just before"
