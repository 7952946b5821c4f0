"""Print command N (1: install and serve, 2: tests) of the README's Quick start.

`.ci/run` runs the README's commands as written, so they cannot drift from what CI checks:
the N-th fenced ``bash`` block of the "Quick start" section is command N.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def quick_start_commands(readme: str) -> list[str]:
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    return [" ".join(line.strip() for line in b.strip().splitlines()) for b in blocks]


if __name__ == "__main__":
    commands = quick_start_commands((Path(__file__).parents[1] / "README.md").read_text())
    if len(commands) != 2:
        sys.exit(f"README's Quick start must give exactly two commands, found {len(commands)}")
    print(commands[int(sys.argv[1]) - 1])
