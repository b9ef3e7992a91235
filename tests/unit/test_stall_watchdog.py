"""Shuttle's stall watchdog: a loop that stops turning gets its stacks written to stderr."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import asyncio, time
    from treadle.shuttle import stall

    def stuck_in_a_blocking_call():
        time.sleep({block})

    async def main():
        watchdog = asyncio.create_task(stall.watch(after_s=0.5))
        await asyncio.sleep(0)
        stuck_in_a_blocking_call()
        watchdog.cancel()

    asyncio.run(main())
    print("finished")
    """
)


def _run(block: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(block=block)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_blocked_loop_has_every_threads_stack_written_once_and_the_process_goes_on() -> None:
    done = _run(block=3.0)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "finished"
    assert "stuck_in_a_blocking_call" in done.stderr
    assert done.stderr.count("stuck_in_a_blocking_call") == 1  # once per stall


def test_a_loop_that_keeps_turning_reports_nothing() -> None:
    done = _run(block=0.0)
    assert done.returncode == 0, done.stderr
    assert "Thread" not in done.stderr and "stuck_in_a_blocking_call" not in done.stderr
