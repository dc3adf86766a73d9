"""examples/offline_topk.py runs end to end (a few steps) and prints both students' rows."""

import importlib.util
import pathlib

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "offline_topk.py"


@pytest.mark.slow
def test_offline_topk_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("offline_topk", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--steps", "3", "--teacher-steps", "3", "--k", "4",
                        "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("offline top-k", "online dense"))]
    assert len(rows) == 2
    for row in rows:  # final loss, held-out KL, held-out CE, seconds: finite numbers
        values = [float(v) for v in row[-4:]]
        assert all(v == v and v >= 0 for v in values)
    assert (tmp_path / "store" / "store.json").exists()
