"""Send the same request from many threads released at once, to race them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def at_once(count: int, send: Callable[[], T]) -> list[T]:
    """`send()` from `count` threads that start together; their answers, in finishing order."""
    start = threading.Barrier(count)
    answers: list[T] = []

    def run() -> None:
        start.wait()
        answers.append(send())

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers
