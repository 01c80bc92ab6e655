"""The side channel's wire format: words, marks and failure records (pure functions, no group).

What these words do between real ranks (mismatches raising, failure bits) is tested on gloo
groups in test_barriers.py and test_failure_semantics.py; here, the bit layout itself.
"""

from __future__ import annotations

import itertools

import pytest

from accel_utils._side.wire import (
    PAYLOAD_BITS,
    WORDS,
    Call,
    Failure,
    Kind,
    Mark,
    Phase,
    Record,
    Reduced,
)


def _or(*calls: Call) -> Reduced:
    words = [0] * WORDS
    for call in calls:
        words = [a | b for a, b in zip(words, call.pack(), strict=True)]
    assert all(-(1 << 63) <= w < 1 << 63 for w in words)  # what an int64 tensor holds
    return Reduced(tuple(words))


def test_a_full_payload_is_neither_a_confirm_request_nor_a_failure() -> None:
    # payload bit 29 and the confirm bit were one bit (a path probe's random token asked for a
    # second round; node 29's failure read as a confirm request)
    full = (1 << PAYLOAD_BITS) - 1
    reduced = _or(Call(Kind.PROBE, "", 7, payload=full))
    assert (reduced.payload, reduced.confirm, reduced.failed, reduced.mismatched) == (
        full, False, False, False)
    flagged = _or(Call(Kind.GUARD, "local", 3, payload=5, failed=True, confirm=True))
    assert (flagged.payload, flagged.confirm, flagged.failed) == (5, True, True)


def test_payloads_are_or_ed_and_out_of_range_ones_refused() -> None:
    assert _or(Call(Kind.PROBE, "", 1, payload=0b01), Call(Kind.PROBE, "", 1, payload=0b10)
               ).payload == 0b11
    for bad in (-1, 1 << PAYLOAD_BITS):
        with pytest.raises(ValueError, match=f"fit in {PAYLOAD_BITS} bits"):
            Call(Kind.PROBE, "", 1, payload=bad).pack()


def test_different_calls_mismatch_and_equal_ones_do_not() -> None:
    guard = Call(Kind.GUARD, "global", 4)
    assert not _or(guard, guard).mismatched
    assert _or(guard, Call(Kind.BARRIER, "global", 4)).mismatched
    assert _or(guard, Call(Kind.GUARD, "global", 5)).mismatched
    # every bit of the call number counts: 8 of them did, so calls 256 apart paired
    for seq in (1, 255, 1 << 20, (1 << 40) + 7):
        assert _or(Call(Kind.LOG, "x", seq), Call(Kind.LOG, "x", seq + 256)).mismatched
        assert _or(Call(Kind.LOG, "x", seq), Call(Kind.LOG, "x", seq + (1 << 32))).mismatched


def test_labels_never_pair_with_other_labels() -> None:
    # 5 bits of a CRC told labels apart: 1 pair in 32 of different labels paired silently
    labels = [f"checkpoint {i}" for i in range(3000)] + ["", " ", "a", "A", "é", "\x00"]
    calls = [Call(Kind.LOG, label, 9) for label in labels]
    assert not any(_or(c, c).mismatched for c in calls)
    missed = [(a.label, b.label) for a, b in itertools.pairwise(calls) if not _or(a, b).mismatched]
    assert missed == []


def test_marks_round_trip_with_their_phase() -> None:
    for phase in Phase:
        mark = Mark(12, phase, 3)
        assert Mark.parse(str(mark).encode()) == mark


def test_records_round_trip_and_a_foreign_one_is_refused_by_name() -> None:
    record = Record(Failure.TIMEOUT, 9, 1, "barrier", timeout_s=2.5, missing=(0, 3),
                    unresponsive=(2,))
    assert Record.from_json(record.to_json()) == record
    assert Record.from_json(Record(Failure.DIED, 2, 0, "x").to_json()).missing is None
    for raw in ('{"kind": "exploded", "seq": 1, "by": 0, "what": "x"}', "[]", "not json"):
        with pytest.raises(ValueError, match="not a side-channel failure record"):
            Record.from_json(raw)
