"""Tests for d2engine.utils.watchdog: the progress watchdog, its report, stack dumps on a signal."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dist_helpers
import pytest

from d2engine.utils import watchdog
from d2engine.utils.watchdog import HANG_EXIT_CODE, ProgressWatchdog, keep_alive


@pytest.fixture
def reports() -> Iterator[dist_helpers.ErrorRecords]:
    with dist_helpers.collect_errors("d2engine.utils.watchdog") as records:
        yield records


def _blocked_in_a_data_loader(event: threading.Event) -> None:
    event.wait(timeout=10)  # released by the report


@pytest.mark.timeout(30)
def test_reports_where_the_main_thread_is_stuck_with_every_stack(
    reports: dist_helpers.ErrorRecords, capsys: pytest.CaptureFixture[str]
) -> None:
    dog = ProgressWatchdog(
        0.3, lambda: 7, describe=lambda: "in iteration 7", end_process=False, poll=0.05
    )
    start = time.monotonic()
    dog.start()
    try:
        _blocked_in_a_data_loader(reports.fired)
    finally:
        dog.stop()
    assert reports.fired.is_set(), "the watchdog did not fire"
    assert 0.3 <= time.monotonic() - start < 5
    assert dog.fired == 1
    (report,) = reports.messages
    first_line = report.splitlines()[0]
    assert "This process (pid" in first_line
    assert "made no training progress for" in first_line
    assert "(hang timeout 0.3 s) in iteration 7" in first_line
    # the innermost frame is in the standard library: the caller that matters is named too
    assert "in wait (called from " in first_line
    assert first_line.endswith("in _blocked_in_a_data_loader).")
    assert 'Thread "MainThread"' in report
    assert "_blocked_in_a_data_loader" in report.split("Python stacks", 1)[1]
    assert 'Thread "d2engine-hang-watchdog"' not in report  # its own stack is left out
    # no console handler of the logger: the report also goes to stderr
    assert first_line in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_progress_and_keep_alive_hold_it_off_a_stall_fires_it(
    reports: dist_helpers.ErrorRecords,
) -> None:
    value = [0]
    dog = ProgressWatchdog(0.4, lambda: value[0], end_process=False, poll=0.02)
    dog.start()
    try:
        for _ in range(6):  # progress for 0.6 s, longer than the timeout
            time.sleep(0.1)
            value[0] += 1
        for _ in range(6):  # no new value, but alive (an evaluation) for 0.6 s
            time.sleep(0.1)
            keep_alive()
        assert dog.fired == 0
        assert reports.fired.wait(timeout=5)  # then a stall: it fires
        assert dog.fired == 1
        time.sleep(0.6)
        assert dog.fired == 1  # once per stall
        value[0] += 1
        reports.fired.clear()
        assert reports.fired.wait(timeout=5)  # progress re-arms it
        assert dog.fired == 2
    finally:
        dog.stop()
    assert not any(t.name == "d2engine-hang-watchdog" for t in threading.enumerate())
    assert watchdog._ACTIVE == ()
    keep_alive()  # nothing runs: a no-op


def test_a_failing_progress_function_stops_the_thread() -> None:
    calls = [0]

    def progress() -> int:  # works when sampled at start, then the trainer is gone
        calls[0] += 1
        if calls[0] > 1:
            raise ReferenceError("weakly-referenced object no longer exists")
        return 0

    dog = ProgressWatchdog(0.1, progress, end_process=False, poll=0.01)
    dog.start()
    thread = dog._thread
    assert thread is not None
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert dog.fired == 0
    dog.stop()


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "ten", None, True])
def test_check_hang_timeout_refuses_what_is_not_a_duration(value: object) -> None:
    with pytest.raises(
        ValueError, match=r"SOLVER.HANG_TIMEOUT must be a number of seconds >= 0.*HINT"
    ):
        watchdog.check_hang_timeout(value, "SOLVER.HANG_TIMEOUT")
    assert watchdog.check_hang_timeout("60", "x") == 60.0
    assert watchdog.check_hang_timeout(0, "x") == 0.0


def test_a_watchdog_needs_a_positive_timeout() -> None:
    with pytest.raises(ValueError, match="must be > 0.*HINT"):
        ProgressWatchdog(0, lambda: 0)


@pytest.mark.parametrize(
    ("last_line", "expected"),
    [
        (
            "RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms "
            "for recv operation to complete",
            True,
        ),
        (
            "torch.distributed.DistBackendError: [Rank 0] Watchdog caught collective operation "
            "timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE) ran for 600000 milliseconds",
            True,
        ),
        (
            "torch.distributed.DistStoreError: Timed out after 91 seconds waiting for clients. "
            "1/2 clients joined.",
            True,
        ),
        ("ValueError: boom on rank 1", False),
        ("RuntimeError: Connection closed by peer [127.0.0.1]:7835", False),
    ],
)
def test_is_timeout_error_reads_the_exception_line(last_line: str, expected: bool) -> None:
    text = f'Traceback (most recent call last):\n  File "x.py", line 1, in f\n{last_line}\n'
    assert watchdog.is_timeout_error(text) is expected
    assert watchdog.is_timeout_error("") is False


_STUCK_SCRIPT = """
import sys, time
from d2engine.utils.watchdog import ProgressWatchdog, enable_stack_dumps

def stuck_in_a_collective():
    print("ready", flush=True)
    time.sleep(60)

enable_stack_dumps(open(sys.argv[1], "a"))
ProgressWatchdog(float(sys.argv[2]), lambda: 0, describe=lambda: "in iteration 3").start()
stuck_in_a_collective()
"""


@pytest.mark.timeout(60)
def test_a_stuck_process_dumps_its_stack_on_request_and_its_watchdog_ends_it(
    tmp_path: Path,
) -> None:
    dump = tmp_path / "stack.txt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK_SCRIPT, str(dump), "2"],
        env=dist_helpers.python_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        # SIGUSR2 (faulthandler, from C): the stack while the main thread sleeps, and it lives on
        (text,) = watchdog.request_stack_dumps([(proc.pid, str(dump))])
        assert "in stuck_in_a_collective" in text
        assert proc.poll() is None
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == HANG_EXIT_CODE, err
    assert time.monotonic() - start < 10
    first = err.splitlines()[0]
    assert first.startswith("Hang watchdog: This process (pid ")
    assert "(hang timeout 2 s) in iteration 3" in first
    assert first.endswith('Its thread "MainThread" is at <string>:7 in stuck_in_a_collective.')
    assert "Hang watchdog: ending this process with exit code 124." in err
