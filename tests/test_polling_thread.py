"""tests.helpers.PollingThread, the base of the tests' samplers: what a test relies on when
it asserts on what one saw."""

from __future__ import annotations

import threading

import pytest

from tests.helpers import PollingThread, changing


def test_an_exception_in_the_thread_is_raised_in_the_test_once():
    failing = threading.Event()

    def sample():
        failing.set()
        raise OSError("the disk is gone")

    poller = PollingThread(sample, name="failing")
    with pytest.raises(OSError, match="the disk is gone") as caught:
        with poller:
            failing.wait(5)
    assert "raised in the failing thread" in caught.value.__notes__
    poller.stop()  # said once: stopping again raises nothing
    with pytest.raises(OSError, match="the disk is gone"), PollingThread(sample) as poller:
        poller.wait_polls()  # the test waiting on it hears of it at once


def test_wait_polls_returns_after_a_round_begun_after_the_call():
    log: list[str] = []
    poller = PollingThread(name="logger")

    def sample():
        log.append("begin")
        poller.stopping.wait(0.005)  # a round that takes a while: one is under way at the call
        log.append("end")

    poller.sample = sample
    with poller:
        for _ in range(5):
            mark = len(log)
            poller.wait_polls()
            after = log[mark:]
            assert "begin" in after and "end" in after[after.index("begin") :], (mark, log)
    assert poller.polls >= 5


def test_rounds_that_saw_nothing_are_not_counted_and_stop_needs_no_start():
    rounds: list[int] = []

    def sample():
        rounds.append(len(rounds))
        return len(rounds) % 2 == 0 and None  # every other round: False, nothing seen

    with PollingThread(sample) as poller:
        poller.wait_polls(3)
    assert poller.polls == len(rounds) // 2
    PollingThread(sample).stop()


def test_changing_passes_the_round_number():
    seen: list[int] = []
    with changing(seen.append) as changer:
        changer.wait_polls(3)
    assert seen == list(range(len(seen))) and len(seen) >= 3
