"""The `fastkd` command (also `python -m fastkd`): one entry point, one module per subcommand.

`COMMANDS` maps each subcommand to the module that implements it and a one-line summary for
`fastkd --help`. A subcommand module exposes ``main(argv: Sequence[str]) -> int`` (argv: the
arguments after the subcommand's name; it parses them itself, so `fastkd NAME --help` is its
own) and is imported only when its subcommand runs, so `fastkd --help` stays fast and a
subcommand's optional dependencies never burden another. Adding a subcommand is one line in
`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, Optional, Sequence, Tuple

COMMANDS: Dict[str, Tuple[str, str]] = {
    # name: (module with main(argv) -> int, one-line summary)
    "bench": ("fastkd.bench.cli", "time the losses against PyTorch and peer libraries"),
    "cache-teacher": ("fastkd.cli.cache_teacher",
                      "store a local causal LM's top-k log-probabilities for offline distillation"),
    "demo": ("fastkd.demo.cli", "distil a small MLP on scikit-learn's digits"),
}


def version() -> str:
    """The installed fastkd version (from the package metadata written at build time)."""
    from importlib import metadata

    try:
        return metadata.version("fastkd")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: `--help`, `--version`, and the subcommand name."""
    width = max(len(name) for name in COMMANDS)
    listing = "\n".join(f"  {name:<{width}}  {summary}"
                        for name, (_, summary) in sorted(COMMANDS.items()))
    parser = argparse.ArgumentParser(
        prog="fastkd", usage="fastkd [-h] [--version] COMMAND [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fused knowledge-distillation losses for PyTorch: command-line tools.",
        epilog=f"commands:\n{listing}\n\nRun `fastkd COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"fastkd {version()}")
    parser.add_argument("command", metavar="COMMAND", choices=sorted(COMMANDS),
                        help="one of: " + ", ".join(sorted(COMMANDS)))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `fastkd [--help | --version | COMMAND [options]]`.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after `fastkd` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: the subcommand's, 0 for `--help` / `--version`, 2 for a missing or
        unknown command.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        try:
            parser.parse_args(argv[:1])   # --help / --version exit 0; a bad name exits 2
        except SystemExit as done:
            return int(done.code or 0)
    module_name, _ = COMMANDS[argv[0]]
    run = importlib.import_module(module_name).main
    try:
        return int(run(argv[1:]) or 0)
    except SystemExit as done:     # argparse inside the subcommand (--help, bad options)
        code = done.code
        if code is None or isinstance(code, int):
            return int(code or 0)
        print(code, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
