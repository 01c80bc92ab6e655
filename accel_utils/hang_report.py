"""What a :class:`~accel_utils.HangWatch` says when training stalls: each rank's report, one table.

Each rank of a stalled job reports its last step and phase and where its main thread stands
(:func:`where_now`, read from ``sys._current_frames``: no signal, no cooperation of the main
thread). The reporting ranks turn every rank's report, or its sign of life when it sent none,
into one table (:func:`stall_table`). When most ranks wait in a collective, the collective is
where they are, not where the fault is, so the table prints the largest group of ranks that
stand in one place once and every other rank in full: behind or ahead of that group (a
straggler), at the same step but elsewhere (a desync), not responding, or dead.
"""

from __future__ import annotations

import json
import os
import re
import sys
import sysconfig
from collections import Counter
from dataclasses import asdict, dataclass

from accel_utils._side.life import Life

_FRAMES = 4  # frames of a stack kept in a report, innermost first
_COLLECTIVE_FILES = {"distributed_c10d.py", "c10d_logger.py"}
_COLLECTIVE = re.compile(r" in _?\w*(all_?reduce|all_?gather|broadcast|barrier|reduce_scatter|"
                         r"all_to_all)\w*$")
_LIBRARY_DIRS = tuple(sorted({os.path.realpath(p) + os.sep for p in (
    sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
    sysconfig.get_paths()["platlib"], os.path.dirname(__file__))}))


@dataclass(frozen=True)
class RankReport:
    """One rank's account of a stall."""

    rank: int  # in the watched group
    node: int  # the launcher's node rank (-1: unknown)
    host: str
    step: int
    phase: str
    quiet_s: float  # since this rank last made progress
    where: tuple[str, ...]  # its main thread's frames, "file:line in function", innermost first
    spot: str  # the innermost frame in the user's code (the one to look at)
    held_s: float = 0.0  # how late the watch thread woke (the GIL held by a C call)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> RankReport:
        fields = json.loads(raw)
        fields["where"] = tuple(fields["where"])
        return cls(**fields)

    @property
    def in_collective(self) -> bool:
        """Whether its main thread is inside a torch.distributed collective (or DDP's)."""
        return any(f.split(":", 1)[0] in _COLLECTIVE_FILES or _COLLECTIVE.search(f)
                   for f in self.where)

    @property
    def place(self) -> str:
        """Where it stands: its spot, and the call it is inside when that is elsewhere."""
        inner = self.where[0].rsplit(" in ", 1)[-1] if self.where else ""
        return self.spot + (f" -> {inner}" if self.where and self.where[0] != self.spot else "")


def where_now(thread_id: int) -> tuple[tuple[str, ...], str]:
    """The frames of thread ``thread_id`` (innermost first) and the innermost user frame."""
    frame = sys._current_frames().get(thread_id)
    frames: list[str] = []
    spot = ""
    while frame is not None:
        code = frame.f_code
        text = f"{os.path.basename(code.co_filename)}:{frame.f_lineno} in {code.co_name}"
        if len(frames) < _FRAMES:
            frames.append(text)
        if not spot and not os.path.realpath(code.co_filename).startswith(_LIBRARY_DIRS):
            spot = text
        frame = frame.f_back
    return tuple(frames), spot or (frames[0] if frames else "unknown (no Python frame)")


@dataclass(frozen=True)
class Silent:
    """What the reporter knows of a rank that sent no report."""

    rank: int
    life: Life | None  # its last sign of life, if any
    verdict: str  # "died", "not responding", "never" (no sign), "moving" or "left"
    for_s: float = 0.0  # how long its sign of life stood still


def _ranks(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2, 5``."""
    runs: list[list[int]] = []
    for rank in sorted(ranks):
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def _s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _node(node: int, host: str) -> str:
    return f"node {node}" if node >= 0 else host


def stall_table(reports: dict[int, RankReport], silent: list[Silent],
                stall_s: float) -> tuple[str, list[int]]:
    """The report of a stall, and the ranks it names as the odd ones out.

    Args:
        reports: the reports received, by rank.
        silent: the ranks that sent none.
        stall_s: the stall limit that fired (for the headline).
    """
    groups = Counter((r.step, r.phase, r.spot) for r in reports.values())
    waiting = {(r.step, r.phase, r.spot) for r in reports.values() if r.in_collective}
    inside = {(r.step, r.phase, r.spot) for r in reports.values() if r.where[:1] != (r.spot,)}
    # the crowd: the most ranks in one place; on a tie, ranks that wait in a collective, then
    # ranks inside library code (not running a line of their own)
    step, phase, spot = max(groups, key=lambda k: (groups[k], k in waiting, k in inside),
                            default=(-1, "-", ""))
    crowd = sorted(r for r, rep in reports.items() if (rep.step, rep.phase, rep.spot)
                   == (step, phase, spot))
    lines, odd = [], []
    if crowd:
        first = reports[crowd[0]]
        quiet = max(reports[r].quiet_s for r in crowd)
        who = f"{len(crowd)} ranks" if len(crowd) > 1 else f"rank {crowd[0]}"
        lines.append(f"  {who:<10} step {step:<6} {phase:<10} {first.place}  (no progress for "
                     f"{_s(quiet)}{f'; ranks {_ranks(crowd)}' if len(crowd) > 1 else ''})")
    for rank in sorted(set(reports) - set(crowd)):
        rep = reports[rank]
        if rep.step < step:
            why = f"behind by {step - rep.step} step{'s' if step - rep.step > 1 else ''}"
        elif rep.step > step:
            why = f"ahead by {rep.step - step} step{'s' if rep.step - step > 1 else ''}"
        elif rep.in_collective and reports[crowd[0]].in_collective:
            why = "a desync: in another collective than the others"
        elif reports[crowd[0]].in_collective:
            why = "a straggler: the others wait for it in a collective"
        else:
            why = "same step, elsewhere"
        odd.append(rank)
        lines.append(f"  rank {rank:<5} step {rep.step:<6} {rep.phase:<10} {rep.place}  "
                     f"{_node(rep.node, rep.host)}, {why}")
    for s in sorted(silent, key=lambda s: s.rank):
        where = "" if s.life is None else _node(s.life.node, s.life.host)
        last = "" if s.life is None or s.life.step < 0 else (
            f", last seen at step {s.life.step} in {s.life.phase}")
        text = {"died": "died (its process is gone)",
                "not responding": f"not responding for {_s(s.for_s)} (frozen or unreachable)",
                "moving": "sent no report: alive (its sign of life moves), its watch saw no stall",
                "left": "has left the watch (its loop ended or raised)",
                }.get(s.verdict, "no sign of life (never reached the watch)")
        if s.verdict not in ("moving", "left"):
            odd.append(s.rank)
        lines.append(f"  rank {s.rank:<5} {text}  {where}{last}".rstrip())
    held = max((r.held_s for r in reports.values()), default=0.0)
    named = ", ".join(f"rank {r}" for r in odd[:8]) + (" ..." if len(odd) > 8 else "")
    quiet = max((r.quiet_s for r in reports.values()), default=stall_s)
    head = f"HangWatch: no progress for {_s(quiet)} (limit {_s(stall_s)}) at step {step}; " + (
        f"look at {named}" if odd else f"rank {crowd[0]} stands at {spot}" if len(crowd) == 1
        else f"every rank stands at {spot}: what do they wait for outside this group?")
    if held > 1.0:
        lines.append(f"  (the watch thread was held {held:.1f} s: the main thread kept the GIL "
                     "inside a C call)")
    return "\n".join([head, *lines]), odd


def judge_silent(rank: int, now: Life | None, first: Life | None, waited: float) -> Silent:
    """A rank that sent no report: dead, frozen (its sign of life stood still) or moving."""
    if now is None:
        return Silent(rank, None, "never", waited)
    if now.gone_from_this_host():
        return Silent(rank, now, "died")
    if now.step < 0:
        return Silent(rank, now, "left")
    if first is not None and now.count != first.count:
        return Silent(rank, now, "moving")
    return Silent(rank, now, "not responding", waited)
