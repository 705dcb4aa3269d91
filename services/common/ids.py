"""UUIDv7 ids: time-ordered, so new rows land at the right edge of every index."""

from __future__ import annotations

import os
import threading
import time
import uuid

# The 74 bits after the timestamp (rand_a and rand_b, around the version and variant).
_RANDOM_BITS = 74
_lock = threading.Lock()
_last = (0, 0)  # the last id's milliseconds and random bits


def uuid7() -> uuid.UUID:
    """A UUID version 7 (RFC 9562): 48-bit Unix milliseconds, then random bits; each one this
    process makes is greater than the one before (RFC 9562, 6.2, method 2: within a millisecond,
    or with the clock set back, the random bits of the last one plus a random increment).

    Orders written together share their `created_at`, and lists break that tie by id: with
    ids in creation order, newest first is what it says."""
    global _last
    millis = time.time_ns() // 1_000_000
    noise = int.from_bytes(os.urandom(10), "big")
    with _lock:
        last_millis, last_bits = _last
        if millis > last_millis:
            bits = noise & ((1 << _RANDOM_BITS) - 1)
        else:
            millis = last_millis
            bits = last_bits + 1 + (noise >> (80 - 32))  # up to 2^32 on top of one
            if bits >> _RANDOM_BITS:  # spent (after ~2^42 ids in one millisecond): the next one
                millis, bits = millis + 1, noise & ((1 << (_RANDOM_BITS - 1)) - 1)
        _last = (millis, bits)
    value = (millis & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (bits >> 62) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= bits & ((1 << 62) - 1)  # rand_b, 62 bits
    return uuid.UUID(int=value)
