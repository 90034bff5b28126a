"""driver/stop.py: the first signal asks for a clean stop, a second one or the end of the grace stops at once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from prorank.driver.stop import StopNow, StopSignals


@pytest.fixture
def restored():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _wait_for_signals(until=lambda: False):
    for _ in range(100):  # a handler runs between bytecodes of the main thread
        if until():
            return
        time.sleep(0.01)


def test_first_signal_asks_second_stops_at_once(restored, capsys):
    asked = []
    signals = StopSignals(grace_seconds=30)
    signals.install(on_stop=lambda: asked.append(signals.name))
    os.kill(os.getpid(), signal.SIGTERM)
    _wait_for_signals()
    assert asked == ["SIGTERM"] and signals.exit_code == 143
    assert "SIGTERM: stopping after this step with a checkpoint (at most 30 s" in capsys.readouterr().err
    with pytest.raises(StopNow, match="SIGINT: stopping at once"):
        os.kill(os.getpid(), signal.SIGINT)
        _wait_for_signals()
    assert signals.exit_code == 143  # the first signal decides the exit code


def test_the_grace_running_out_stops_at_once_and_disarm_cancels_it(restored):
    signals = StopSignals(grace_seconds=0.2)
    signals.install(on_stop=lambda: None)
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(StopNow, match=r"longer than train.stop_grace_seconds \(0.2 s\)"):
        time.sleep(5)
    assert signals.exit_code == 130

    signals = StopSignals(grace_seconds=0.2)
    signals.install(on_stop=lambda: None)
    os.kill(os.getpid(), signal.SIGTERM)
    _wait_for_signals(until=lambda: signals.received)
    signals.disarm()  # the checkpoint is written: no alarm any more
    time.sleep(0.4)


def test_before_the_job_runs_a_signal_stops_at_once(restored):
    signals = StopSignals(grace_seconds=30)
    signals.install()
    with pytest.raises(StopNow):
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for_signals()
    assert signals.exit_code == 143
