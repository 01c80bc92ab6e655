"""What travels between members: the operation word, the heartbeat mark, the failure record.

* The **words**: each member's share of an operation's one reduction (bitwise OR) of seven
  int64s. Three carry the call's identity (kind and ``seq``; a 128-bit BLAKE2b digest of the
  label), three the same inverted: two members in different calls leave a bit set in both a word
  and its inverse, so a mismatch shows in the OR on every rank. The identity is whole (every
  bit of ``seq``, the label's digest rather than a few bits of a checksum), so two different
  calls never pair. The seventh word carries a payload (OR-ed) and two flags: a member asks for
  a confirming second round, a member failed.
* The **mark**: a member's latest heartbeat in the job's store (``"seq phase count"``).
* The **failure record**: JSON in the job's store under the operation's key, first writer wins.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from enum import Enum, IntEnum
from typing import Any

KIND_BITS = 3
SEQ_BITS = 63 - KIND_BITS  # a job makes fewer calls than this on one lane
PAYLOAD_BITS = 60
CONFIRM_BIT = 1 << PAYLOAD_BITS
FAILED_BIT = CONFIRM_BIT << 1
IDENTITY_WORDS = 3  # kind and seq, then the label's digest in two words
WORDS = 2 * IDENTITY_WORDS + 1
_WORD = (1 << 64) - 1


def _signed(value: int) -> int:
    """``value``'s 64 bits as the int64 a tensor holds."""
    value &= _WORD
    return value - (1 << 64) if value >> 63 else value


class Kind(IntEnum):
    """Which operation a word belongs to (part of the tag)."""

    CREATE = 1
    BARRIER = 2
    GUARD = 3
    LOG = 4
    PROBE = 5
    GATHER = 6


@dataclass(frozen=True)
class Call:
    """One member's share of operation ``seq``: what it is in, and what it contributes."""

    kind: Kind
    label: str
    seq: int
    payload: int = 0
    failed: bool = False
    confirm: bool = False

    def pack(self) -> list[int]:
        """The int64 words (see the module docstring)."""
        if not 0 <= self.payload < 1 << PAYLOAD_BITS:
            raise ValueError(f"payload must fit in {PAYLOAD_BITS} bits; got {self.payload}")
        if not 0 <= self.seq < 1 << SEQ_BITS:
            raise ValueError(f"call number out of range: {self.seq}")
        digest = hashlib.blake2b(self.label.encode(), digest_size=16).digest()
        identity = [int(self.kind) | self.seq << KIND_BITS,
                    int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")]
        last = (self.payload | (FAILED_BIT if self.failed else 0)
                | (CONFIRM_BIT if self.confirm else 0))
        return [_signed(w) for w in (*identity, *(~w for w in identity), last)]


@dataclass(frozen=True)
class Reduced:
    """The OR of every member's words for one operation."""

    words: tuple[int, ...]

    @classmethod
    def nothing(cls) -> Reduced:
        """What a member that only contributed (and did not wait) learns: nothing."""
        return cls((0,) * WORDS)

    @property
    def mismatched(self) -> bool:
        """Members were in different calls (a bit set in both a word and its inverse)."""
        return any(self.words[i] & self.words[i + IDENTITY_WORDS] & _WORD
                   for i in range(IDENTITY_WORDS))

    @property
    def failed(self) -> bool:
        """A member contributed a failure (a first rank whose block raised)."""
        return bool(self.words[-1] & FAILED_BIT)

    @property
    def confirm(self) -> bool:
        """A member asks for a second round (it waited long: a peer may have died since)."""
        return bool(self.words[-1] & CONFIRM_BIT)

    @property
    def payload(self) -> int:
        """The OR of every member's payload."""
        return self.words[-1] & ((1 << PAYLOAD_BITS) - 1)


class Order(str, Enum):
    """Which ranks of a guard go first; the guard's label on the wire is the value."""

    PER_NODE = "local"  # each node's local rank 0
    GLOBAL = "global"  # rank 0 of the group


class Phase(str, Enum):
    """Where a member is inside an operation, as its mark says."""

    WORKING = "w"  # running a guarded block first
    ARRIVED = "a"  # waiting for the others
    NONE = "-"  # in no operation yet


@dataclass(frozen=True)
class Mark:
    """A member's latest heartbeat: the operation it is in, its phase there, a counter."""

    seq: int
    phase: Phase
    count: int

    @classmethod
    def parse(cls, raw: bytes | str) -> Mark:
        seq, phase, count = (raw.decode() if isinstance(raw, bytes) else raw).split()
        return cls(int(seq), Phase(phase), int(count))

    def __str__(self) -> str:
        return f"{self.seq} {self.phase.value} {self.count}"


def mark_key(rank: int) -> str:
    return f"mark/{rank}"


class Failure(str, Enum):
    """Why an operation failed, as its record says."""

    TIMEOUT = "timeout"  # a member's timeout ran out
    UNRESPONSIVE = "unresponsive"  # members' heartbeats stopped for the liveness window
    RESOURCES = "resources"  # a member cannot open the side group's sockets
    CREATION = "creation"  # a member could not create the side group (not a timeout)
    FAILED = "failed"  # a first rank's block raised
    DIED = "died"  # a connection dropped: members whose heartbeat stopped are gone
    STORE_LOST = "store_lost"  # the job's store stopped answering: nobody can be judged


@dataclass(frozen=True)
class Record:
    """A failed operation, as every member reads it from the job's store.

    Attributes:
        kind: why it failed.
        seq: the operation.
        by: the member that wrote the record.
        what: the operation's name for messages (``"FirstRankPerNode"``, ``"barrier"``).
        message: the failure's own words (an exception's, gloo's, a resource check's).
        ranks: the members it names: the unresponsive, the dead.
        missing: members that had not arrived (None: a timeout's publisher has not looked yet).
        unresponsive: members that arrived but went silent (timeouts).
        timeout_s: the timeout that ran out.
        liveness_s: the liveness window that ran out.
        rank: the failing first rank, or the member that could not create the group.
        node: the failing first rank's node.
        exc_type: the failing exception's class name (or ``"died"``).
        label: the operation's label (a guard's order).
    """

    kind: Failure
    seq: int
    by: int
    what: str
    message: str = ""
    ranks: tuple[int, ...] = ()
    missing: tuple[int, ...] | None = None
    unresponsive: tuple[int, ...] = ()
    timeout_s: float | None = None
    liveness_s: float | None = None
    rank: int | None = None
    node: int | None = None
    exc_type: str = ""
    label: str = ""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "kind": self.kind.value})

    @classmethod
    def from_json(cls, raw: bytes | str) -> Record:
        """The record stored as ``raw``.

        Raises:
            ValueError: not a record this version of accel-utils writes (another version on
                some ranks, or a foreign key).
        """
        try:
            fields: dict[str, Any] = json.loads(raw)
            fields["kind"] = Failure(fields["kind"])
            for name in ("ranks", "missing", "unresponsive"):
                if fields.get(name) is not None:
                    fields[name] = tuple(fields[name])
            return cls(**fields)
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"not a side-channel failure record ({exc}): {raw!r:.200}; is "
                             "the same accel-utils version installed on every rank?") from exc
