"""The API reference site (docs/): its snippets run, and every public name is documented.

Every Python snippet on the pages (and the doctor's launch) is a file under docs/snippets/ that
the pages include (``--8<--``); each one runs here on 2 gloo processes with a hard timeout and
asserts what its page says. The launch commands for several nodes, mpirun and srun
(launching.md), the benchmark commands and the doctor's sample output are shown, not run.
``mkdocs build --strict`` (in .ci/run) fails on a broken include or reference; since mkdocstrings
leaves out objects without a docstring silently, the check that every public name has one, and a
page, is here.
"""

from __future__ import annotations

import glob
import inspect
import os
import re
import runpy
import subprocess

import pytest

import accel_utils
from accel_utils.integrations.trainer import ShardedGenerationEvalMixin
from tests.harness import REPO_ROOT, free_port, launch_env, run_distributed

DOCS = os.path.join(REPO_ROOT, "docs")
SNIPPETS = os.path.join(DOCS, "snippets")
# run by tests/test_adopt_example.py (under torchrun, compared with the port)
RUN_ELSEWHERE = {"adopt_accelerate_before.py", "adopt_accelerate.diff"}
INCLUDE = re.compile(r'--8<-- "([^":]+)(?::([\w-]+))?"')


def _pages() -> dict[str, str]:
    pages = {}
    for path in sorted(glob.glob(os.path.join(DOCS, "*.md"))):
        with open(path) as fh:
            pages[os.path.basename(path)] = fh.read()
    return pages


def _snippet_files() -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(SNIPPETS, "*")))


def test_every_include_exists_and_every_snippet_is_shown() -> None:
    included = set()
    for page, text in _pages().items():
        for path, section in INCLUDE.findall(text):
            full = os.path.join(REPO_ROOT, path)
            assert os.path.isfile(full), (page, path)
            if section:
                with open(full) as fh:
                    body = fh.read()
                assert f"--8<-- [start:{section}]" in body, (page, path, section)
                assert f"--8<-- [end:{section}]" in body, (page, path, section)
            included.add(os.path.relpath(full, SNIPPETS))
    shown = included | {"adopt_accelerate_before.py"}  # the diff's left side
    assert set(_snippet_files()) <= shown, set(_snippet_files()) - shown


def _documented(obj: object) -> bool:
    return bool((getattr(obj, "__doc__", None) or "").strip())


@pytest.mark.parametrize("name", sorted(set(accel_utils.__all__) - {"__version__", "logger"}))
def test_every_public_name_has_a_docstring_and_a_page(name: str) -> None:
    obj = getattr(accel_utils, name)
    assert _documented(obj), f"accel_utils.{name} has no docstring"
    if inspect.isclass(obj):  # and so does every public method or property it defines
        for attr, value in vars(obj).items():
            if not attr.startswith("_") and (callable(value) or isinstance(value, property)):
                assert _documented(value), f"accel_utils.{name}.{attr} has no docstring"
    assert any(f"::: accel_utils.{name}\n" in text for text in _pages().values()), name


def test_the_trainer_mixin_is_documented() -> None:
    for attr, value in vars(ShardedGenerationEvalMixin).items():
        if callable(value) and (not attr.startswith("_") or attr == "evaluation_loop"):
            assert _documented(value), attr
    assert "::: accel_utils.integrations.trainer.ShardedGenerationEvalMixin" in _pages()[
        "trainer.md"]


def _run_snippet(path: str) -> str:
    runpy.run_path(path, run_name="__main__")
    return "ok"


@pytest.mark.parametrize(
    "snippet", [s for s in _snippet_files() if s.endswith(".py") and s not in RUN_ELSEWHERE]
)
def test_snippet_runs_on_two_processes(snippet: str) -> None:
    out = run_distributed(_run_snippet, 2, os.path.join(SNIPPETS, snippet), timeout=120)
    assert out == ["ok", "ok"]


@pytest.mark.timeout(150)
def test_doctor_snippet(tmp_path) -> None:
    env = launch_env(PORT=str(free_port()), CACHE_DIR=str(tmp_path))
    run = subprocess.run(["bash", os.path.join(SNIPPETS, "doctor.sh")], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "all checks passed" in run.stdout
