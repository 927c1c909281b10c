"""A Ctrl-C while `scrit run` writes its report and summary.json waits until both are on disk.

Without this, a Ctrl-C right after summary.json appeared (as a user or a script that waits for it would
send to stop `--keep-serving`) could cut the report short and end the run with exit 130.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from scrit.rundir import interrupts_deferred


def test_ctrl_c_is_held_until_the_block_is_done() -> None:
    before = signal.getsignal(signal.SIGINT)
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs the handler here; the block must go on
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_is_held_too_and_stop_signals_interrupt_turns_it_into_ctrl_c() -> None:
    from scrit.rundir import stop_signals_interrupt

    before = signal.getsignal(signal.SIGTERM)
    try:
        stop_signals_interrupt()  # what `scrit run` installs: SIGTERM (`ray job stop`) acts as Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        finished = []
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                finished.append(True)
        assert finished == [True]
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_no_ctrl_c_no_interrupt() -> None:
    before = signal.getsignal(signal.SIGINT)
    with interrupts_deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_it_only_runs_the_block() -> None:
    outcome: list[object] = []

    def work() -> None:
        try:
            with interrupts_deferred():
                outcome.append("ran")
        except BaseException as error:  # noqa: BLE001 - the test reports whatever escaped
            outcome.append(error)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert outcome == ["ran"]
