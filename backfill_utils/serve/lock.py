"""A writer-preferring readers-writer lock: the index's searches share it, mutations hold it alone.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator




class RWLock:
    """A writer-preferring readers-writer lock (not reentrant).

    Any number of threads may hold :meth:`read` together; :meth:`write` is held
    by one thread alone. A waiting writer stops new readers from entering, so a
    steady stream of searches cannot starve a backfill.

    >>> lock = RWLock()
    >>> with lock.read():
    ...     with lock.read():  # readers share (from any thread)
    ...         pass
    >>> with lock.write():
    ...     pass
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
