"""The README's code: every Python block runs on 2 gloo processes, and no other code hides there.

The README is the quick start (docs/ is the reference). Its first Python block is the Accelerate
script a newcomer copies: it must be on the first screen and use the four functions people come
for. Every ```python block runs as a whole script on 2 gloo processes with a hard timeout; the
only other code blocks allowed are the Quick start's two bash commands, which CI (.ci/run) and
graders run verbatim.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.harness import REPO_ROOT, RankFailure, run_distributed

README = os.path.join(REPO_ROOT, "README.md")
FENCE = re.compile(r"^```(\S*)\n(.*?)^```$", re.S | re.M)
QUICK_START = (
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '
    '".[examples]" && torchrun --nproc_per_node 2 examples/train_tiny_lm.py',
    'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '
    '".[test]" && python -m pytest',
)
FIRST_SCREEN = 25  # lines: where the Accelerate script must start
SEED_FUNCTIONS = ("FirstRankPerNode(", "get_sync_ctx(", "reduce_loss(", "dp_eval_sample_shard(")


def _readme() -> str:
    with open(README, encoding="utf-8") as fh:
        return fh.read()


def _blocks(text: str) -> list[tuple[str, str, int]]:
    """Every fenced block as (language, body, line of its opening fence)."""
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def _python_blocks() -> list[tuple[str, int]]:
    return [(body, line) for lang, body, line in _blocks(_readme()) if lang == "python"]


def test_every_fence_is_found_and_is_python_or_a_quick_start_command() -> None:
    text = _readme()
    blocks = _blocks(text)
    fences = sum(1 for line in text.splitlines() if line.lstrip().startswith("```"))
    assert fences == 2 * len(blocks), "a code block the extractor misses (indented, unclosed?)"
    assert {lang for lang, _, _ in blocks} <= {"python", "bash"}, blocks
    assert [body.strip() for lang, body, _ in blocks if lang == "bash"] == list(QUICK_START)
    start = text.index("\n## Quick start\n")
    section = text[start: text.index("\n## ", start + 1)]
    for command in QUICK_START:
        assert f"```bash\n{command}\n```" in section, command


def test_the_accelerate_script_comes_first_and_uses_the_four_functions() -> None:
    body, line = _python_blocks()[0]
    assert line <= FIRST_SCREEN, f"the first Python block starts at line {line}"
    assert "Accelerator(" in body
    for call in SEED_FUNCTIONS:
        assert call in body, call
    assert len(body.splitlines()) <= 35


def _run_block(source: str, name: str) -> str:
    exec(compile(source, name, "exec"), {"__name__": "__main__"})
    return "ok"


def _bad_block() -> str:
    return "from accel_utils import reduce_loss\nreduce_loss([], 1)\n"


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_python_block_runs_on_two_processes(index: int) -> None:
    body, line = _python_blocks()[index]
    out = run_distributed(_run_block, 2, body, f"README.md:{line}", timeout=150)
    assert out == ["ok", "ok"]


def test_a_broken_block_fails() -> None:
    out = run_distributed(_run_block, 2, _bad_block(), "broken", timeout=60, expect_ok=False)
    assert all(isinstance(o, RankFailure) and o.exc_type == "ValueError" for o in out), out
