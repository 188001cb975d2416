"""Shared fixtures: both implementations of each hot path, and a guard against leaks.

A test that leaves a thread or a child process behind fails: leaked workers hide bugs and
make later tests flaky.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from mirror import fastpath


def _children() -> set[int]:
    path = f"/proc/{os.getpid()}/task/{os.getpid()}/children"
    try:
        with open(path) as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_threads_or_processes():
    threads_before = set(threading.enumerate())
    children_before = _children()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked_threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        leaked_children = _children() - children_before
        if not leaked_threads and not leaked_children:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    pytest.fail(f"test leaked threads {leaked_threads} / child processes {sorted(leaked_children)}")


def implementations(name: str):
    """``pytest.param`` for the compiled module and its pure twin (both must be importable)."""
    return [
        pytest.param(fastpath.compiled(name), id="fast"),
        pytest.param(fastpath.pure(name), id="pure"),
    ]
