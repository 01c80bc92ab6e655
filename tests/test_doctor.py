"""The real ``python -m accel_utils.doctor``: under torchrun (2 simulated nodes), by hand, alone.

Every test starts the real entry point in fresh processes (torchrun, hand-started workers or the
installed console script); only the argument checks also call :func:`main` in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from accel_utils.doctor import main
from tests.harness import free_port, launch_env, run_commands, run_torchrun

DOCTOR = ["-m", "accel_utils.doctor"]
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "GROUP_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def _bare_env() -> dict[str, str]:
    """The test's environment without any launcher variable (as if started from a shell)."""
    env = launch_env()
    for name in _LAUNCHER_VARS:
        env.pop(name, None)
    return env


def _statuses(report: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in report["checks"]}


def _message(report: dict, name: str) -> str:
    return next(c["message"] for c in report["checks"] if c["name"] == name)


def _two_nodes(tmp_path, node_args: list[list[str]]) -> tuple[dict, str]:
    """A healthy 2 x 2 launch; returns rank 0's JSON report and its stdout."""
    out = tmp_path / "report.json"
    runs = run_torchrun([*DOCTOR, "--json", str(out), "--timeout", "30"], nnodes=2,
                        env=launch_env(), timeout=90, node_args=node_args)
    assert [r.returncode for r in runs] == [0, 0], "\n".join(r.output[-3000:] for r in runs)
    return json.loads(out.read_text()), runs[0].stdout


def _assert_healthy_table(report: dict, stdout: str) -> None:
    rows = [(r["rank"], r["node"], r["num_nodes"], r["local_rank"], r["local_world_size"])
            for r in report["rows"]]
    assert rows == [(0, 0, 2, 0, 2), (1, 0, 2, 1, 2), (2, 1, 2, 0, 2), (3, 1, 2, 1, 2)]
    assert {(r["backend"], r["device"]) for r in report["rows"]} == {("gloo", "cpu")}
    assert [r["accelerate"]["process_index"] for r in report["rows"]] == [0, 1, 2, 3]
    assert report["exit_code"] == 0 and report["failures"] == []
    assert _statuses(report) == {"launcher": "OK", "accelerate": "OK", "path": "OK",
                                 "side channel": "OK", "cuda": "SKIP"}
    # the printed table: a row per rank, sorted by node and local rank
    table = [line.split() for line in stdout.splitlines() if line[:1].isdigit()]
    assert [cells[:3] for cells in table] == [["0", "0/2", "0/2"], ["1", "0/2", "1/2"],
                                              ["2", "1/2", "0/2"], ["3", "1/2", "1/2"]]
    assert "all checks passed: exit 0" in stdout


@pytest.mark.timeout(100)
def test_two_nodes_sharing_a_directory(tmp_path) -> None:
    shared = tmp_path / "cache"
    shared.mkdir()
    report, stdout = _two_nodes(tmp_path, [["--path", str(shared)]] * 2)
    _assert_healthy_table(report, stdout)
    assert "shared by the nodes" in _message(report, "path")
    assert "node 0" in _message(report, "path") and "node 1" in _message(report, "path")
    assert "slowest rank" in _message(report, "side channel")
    assert os.listdir(shared) == []  # neither the probe files nor the markers stay behind


@pytest.mark.timeout(100)
def test_two_nodes_with_node_local_directories(tmp_path) -> None:
    per_node = [tmp_path / "node0", tmp_path / "node1"]
    for path in per_node:
        path.mkdir()
    report, stdout = _two_nodes(tmp_path, [["--path", str(p)] for p in per_node])
    _assert_healthy_table(report, stdout)
    assert "node-local" in _message(report, "path")


@pytest.mark.stack
@pytest.mark.timeout(60)
def test_a_lying_environment_is_reported(tmp_path) -> None:
    # torchrun would overwrite LOCAL_WORLD_SIZE, so two workers are started by hand with a
    # torchrun-like environment in which LOCAL_WORLD_SIZE=3 was exported for 2 processes; and
    # Accelerate's state is built as a script that forgets cpu=True on a CPU machine builds it.
    port = str(free_port())
    report = tmp_path / "report.json"
    commands = [
        ["env", "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}", f"RANK={rank}", "WORLD_SIZE=2",
         f"LOCAL_RANK={rank}", "LOCAL_WORLD_SIZE=3", "GROUP_RANK=0", sys.executable, *DOCTOR,
         "--timeout", "30", "--accelerate", "default", "--json", str(report)]
        for rank in range(2)
    ]
    runs = run_commands(commands, timeout=50, env=_bare_env())
    assert [r.returncode for r in runs] == [1, 1], "\n".join(r.output[-3000:] for r in runs)
    out = runs[0].stdout
    assert "PROBLEM  launcher: node 0 runs 2 ranks but LOCAL_WORLD_SIZE says 3" in out
    accelerate = next(line for line in out.splitlines() if "accelerate:" in line)
    # Accelerate 1.15 counts 1 process without cpu=True on a CPU machine, 1.1 still counts 2:
    # a problem exactly when Accelerate disagrees with torch.distributed
    claimed = {row["accelerate"]["num_processes"] for row in json.loads(report.read_text())["rows"]}
    if claimed != {2}:
        assert accelerate.startswith("PROBLEM")
        assert "PartialState(cpu=False) on rank(s) 0, 1 reports 1 process(es)" in accelerate
        assert "cpu=True" in accelerate and "2 processes" in accelerate
        assert "2 problem(s): exit 1" in out
    else:
        assert accelerate.startswith("OK") and "PartialState(cpu=False) agrees" in accelerate
        assert "1 problem(s): exit 1" in out
    assert runs[1].stdout == ""  # only rank 0 prints


@pytest.mark.timeout(70)
def test_a_killed_rank_is_named_by_rank_0() -> None:
    # Rank 3 (node 1) SIGKILLs itself mid-checks; node 1's torchrun then stops rank 2 too.
    # --timeout is far above the harness's hard limit: rank 0 must report without waiting it out.
    runs = run_torchrun(["tests/scripts/doctor_dies.py", "3", "--timeout", "600"], nnodes=2,
                        env=launch_env(), timeout=60)
    out = runs[0].stdout
    assert runs[0].returncode != 0 and runs[1].returncode != 0, out
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    died = [line for line in problems if " died " in line]
    assert any(line.startswith("PROBLEM  rank 3 (node 1,") for line in died), out
    assert not any(f"rank {r} (node 0" in line for line in died for r in (0, 1)), out
    assert "while timing the side channel" in died[0]
    assert out.rstrip().endswith("exit 1")


@pytest.mark.timeout(60)
def test_one_process_without_a_launcher(tmp_path) -> None:
    script = os.path.join(os.path.dirname(sys.executable), "accel-utils-doctor")
    out = tmp_path / "report.json"
    proc = subprocess.run([script, "--path", str(tmp_path), "--json", str(out)],
                          env=_bare_env(), capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 1 and report["rows"][0]["launcher"] == {}
    assert _statuses(report) == {"launcher": "OK", "accelerate": "OK", "path": "OK",
                                 "side channel": "SKIP", "cuda": "SKIP"}
    assert "one node" in _message(report, "path")
    assert "1 rank(s) on 1 node(s)" in proc.stdout and "all checks passed: exit 0" in proc.stdout


def test_bad_arguments_exit_2_from_the_command_line() -> None:
    proc = subprocess.run([sys.executable, *DOCTOR, "--timeout", "0"], env=_bare_env(),
                          capture_output=True, text=True, timeout=50)
    assert proc.returncode == 2
    assert "expected a positive number of seconds" in proc.stderr


@pytest.mark.parametrize("argv", [["--timeout", "soon"], ["--timeout", "-1"],
                                  ["--accelerate", "maybe"], ["--json", "/no/such/dir/r.json"],
                                  ["--bogus"]])
def test_bad_arguments_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage: accel-utils-doctor" in capsys.readouterr().err


def _accelerate_check_environ() -> dict:
    from accelerate import PartialState

    from accel_utils.doctor import _accelerate_facts

    before = dict(os.environ)
    facts = _accelerate_facts("cpu")
    after_doctor = dict(os.environ)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh state, as in a new process
    PartialState(cpu=True)  # the same call outside the doctor: it does write (the test's premise)
    return {"facts": facts, "unchanged": after_doctor == before,
            "plain_writes": {k: os.environ.get(k) for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE")}}


@pytest.mark.stack
def test_accelerate_check_leaves_the_environment_alone() -> None:
    from tests.harness import run_distributed

    # a launch without torchrun: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT only
    bare = {"LOCAL_RANK": None, "LOCAL_WORLD_SIZE": None, "GROUP_RANK": None,
            "GROUP_WORLD_SIZE": None}
    out = run_distributed(_accelerate_check_environ, 2, env=bare)
    for rank, o in enumerate(out):
        assert o["unchanged"], o
        assert o["facts"]["process_index"] == rank and o["facts"]["num_processes"] == 2
        assert o["plain_writes"] == {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def _rows_for_accelerate(launcher: dict[str, str] | None) -> list[dict]:
    rows = []
    for rank in range(4):
        env = {"RANK": str(rank), "WORLD_SIZE": "4", **(launcher or {})}
        rows.append({"rank": rank, "local_rank": rank % 2, "accelerate": {
            "call": "PartialState(cpu=True)", "type": "MULTI_CPU", "num_processes": 4,
            "process_index": rank, "local_process_index": 0}, "launcher": env})
    return rows


@pytest.mark.stack
def test_accelerate_local_index_without_local_rank_is_a_warning() -> None:
    from accel_utils.doctor.report import Report, check_accelerate

    check = check_accelerate(_rows_for_accelerate(None))
    assert check.status == "WARN"
    assert "rank(s) 1, 3" in check.message and "local_main_process_first" in check.message
    assert Report(checks=[check]).exit_code == 0
    # where the launcher did set LOCAL_RANK, Accelerate disagreeing with it is a problem
    lying = check_accelerate(_rows_for_accelerate({"LOCAL_RANK": "0"}))
    assert lying.status == "PROBLEM"
