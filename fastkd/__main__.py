"""`fastkd` console command: `fastkd demo [...]`, `fastkd bench [...]`."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("demo", "bench", "cache-teacher")
    if not argv or argv[0] not in commands:
        print(f"usage: fastkd {{{','.join(commands)}}} [options]  (see `fastkd COMMAND --help`)")
        return 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as run
    elif command == "cache-teacher":
        from .cli.cache_teacher import main as run
    else:
        from .bench.cli import main as run
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
