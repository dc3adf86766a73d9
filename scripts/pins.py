"""Compare the running environment's packages with constraints.txt, or rewrite the file.

    python scripts/pins.py diff  [--constraints constraints.txt]   # what changed, one per line
    python scripts/pins.py write [--constraints constraints.txt]   # pin this environment

`make test-latest` prints the diff after testing the newest releases; `make pins` writes the
newest set once it has passed. torch keeps its public version (2.13.0, not 2.13.0+cpu) so the
pin matches the local CPU build and never pulls a CUDA wheel. fastkd itself is never pinned.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

HEADER = (
    "# The versions CI last passed with (`make test`, `make demo` install with\n"
    "# -c constraints.txt).\n"
    "# Refresh: `make test-latest` (newest releases, prints what changed), then `make pins`.\n"
)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{canonical name: version} of every distribution in this environment but fastkd."""
    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _canonical(name) not in ("fastkd", "pip", "setuptools", "wheel"):
            versions[_canonical(name)] = dist.version.split("+")[0]
    return versions


def pinned(path: Path) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_canonical(name)] = version.strip()
    return pins


def changes(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Human-readable lines: upgraded / downgraded, added and removed packages."""
    lines = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before == after:
            continue
        if before is None:
            lines.append(f"+ {name} {after} (new)")
        elif after is None:
            lines.append(f"- {name} {before} (no longer installed)")
        else:
            lines.append(f"~ {name} {before} -> {after}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/pins.py")
    parser.add_argument("command", choices=("diff", "write"))
    parser.add_argument("--constraints", type=Path, default=Path("constraints.txt"))
    args = parser.parse_args(argv)
    current = installed()
    if args.command == "write":
        body = "".join(f"{name}=={current[name]}\n" for name in sorted(current))
        args.constraints.write_text(HEADER + body)
        print(f"wrote {len(current)} pins to {args.constraints}")
        return 0
    lines = changes(pinned(args.constraints), current)
    print(f"against {args.constraints}: " + (f"{len(lines)} changed" if lines else "no change"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
