"""Users' type checkers see accel-utils' public names with their real signatures, not ``Any``
(the names load lazily at run time; ``TYPE_CHECKING`` imports and ``py.typed`` tell checkers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import accel_utils
from tests.harness import REPO_ROOT, launch_env


def test_public_names_are_typed_for_users(tmp_path: Path) -> None:
    assert (Path(REPO_ROOT) / "accel_utils" / "py.typed").exists()
    names = [n for n in accel_utils.__all__ if n not in ("logger", "__version__")]
    snippet = tmp_path / "user_code.py"
    snippet.write_text("import accel_utils\n" + "".join(
        f"reveal_type(accel_utils.{name})\n" for name in names))
    run = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--no-incremental",
         str(snippet)],
        capture_output=True, text=True, env=launch_env(), cwd=REPO_ROOT, timeout=180,
    )
    revealed = re.findall(r'Revealed type is "(.*)"', run.stdout)
    assert len(revealed) == len(names), run.stdout + run.stderr
    untyped = [name for name, kind in zip(names, revealed, strict=True) if kind == "Any"]
    assert not untyped, untyped
