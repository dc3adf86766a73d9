"""The `fastkd` console entry point: --help, --version, dispatch to subcommand modules."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from fastkd import __main__ as entry


def run_fastkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastkd", *args], capture_output=True,
                          text=True, timeout=300)


def test_help_exits_zero_and_lists_every_command():
    done = run_fastkd("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: fastkd")
    for name in entry.COMMANDS:
        assert f"  {name}  " in done.stdout or f"  {name} " in done.stdout


def test_version_prints_the_installed_version():
    from importlib import metadata

    done = run_fastkd("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"fastkd {metadata.version('fastkd')}"


def test_missing_or_unknown_command_exits_two(capsys):
    assert entry.main([]) == 2
    assert "usage: fastkd" in capsys.readouterr().err
    assert entry.main(["no-such-command"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(entry.COMMANDS))
def test_every_command_module_has_main_and_its_own_help(name, capsys):
    module_name, summary = entry.COMMANDS[name]
    assert summary and len(summary) <= 76   # one line of `fastkd --help`
    assert callable(importlib.import_module(module_name).main)
    assert entry.main([name, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: fastkd {name}")


def test_dispatch_passes_the_remaining_arguments(monkeypatch):
    seen = []

    class Fake:
        @staticmethod
        def main(argv):
            seen.append(list(argv))
            return 3

    monkeypatch.setitem(entry.COMMANDS, "fake", ("fake_module", "a test command"))
    monkeypatch.setitem(sys.modules, "fake_module", Fake)
    assert entry.main(["fake", "--x", "1"]) == 3
    assert seen == [["--x", "1"]]


def test_subcommand_bad_option_is_an_error_not_a_crash(capsys):
    assert entry.main(["bench", "--loss", "nope"]) == 2
    assert "--loss" in capsys.readouterr().err
