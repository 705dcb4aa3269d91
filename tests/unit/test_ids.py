"""Ids are UUIDv7 in creation order, also within one millisecond."""

from __future__ import annotations

import time
import uuid

import pytest

from services.common import ids


def test_ids_made_in_a_row_are_strictly_increasing_version_7_uuids() -> None:
    # Thousands per millisecond: with plain random bits, those of one millisecond came in any
    # order, and orders written in one group (one created_at) were listed out of order.
    before = time.time_ns() // 1_000_000
    made = [ids.uuid7() for _ in range(20_000)]
    after = time.time_ns() // 1_000_000

    assert made == sorted(made) and len(set(made)) == len(made)
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in made)
    assert before <= made[0].int >> 80 <= made[-1].int >> 80 <= after + 1


def test_ids_keep_increasing_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "_last", ids._last)  # the ids made after this test: as before it
    now = [time.time_ns() + 10**12]  # 1000 s ahead of anything made so far
    monkeypatch.setattr(time, "time_ns", lambda: now[0])
    first = ids.uuid7()
    now[0] -= 5 * 10**9  # five seconds back
    second = ids.uuid7()
    assert second > first
    assert second.int >> 80 == first.int >> 80  # still the later millisecond
