"""The side channel's wire format: words, marks and failure records (pure functions, no group).

What these words do between real ranks (mismatches raising, failure bits) is tested on gloo
groups in test_barriers.py and test_failure_semantics.py; here, the bit layout itself.
"""

from __future__ import annotations

import pytest

from accel_utils._side.wire import (
    PAYLOAD_BITS,
    Call,
    Failure,
    Kind,
    Mark,
    Phase,
    Record,
    Reduced,
)


def _or(*calls: Call) -> Reduced:
    word = 0
    for call in calls:
        word |= call.pack()
    return Reduced(word)


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
