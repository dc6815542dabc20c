"""The shard tools' process pool ends its workers whatever signal handlers the parent process holds."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from bgtrain.trainer import StopRequested
from shards.pool import pool_map, worker_pool

# Run in a child so that a hang is a failed test after 60 s, not a CI job stuck until its global timeout.
SCRIPT = textwrap.dedent("""
    import itertools, time
    from bgtrain.trainer import StopRequested
    from shards.pool import worker_pool

    def fail(i):
        time.sleep(0.01)
        if i == 3:
            raise ValueError("shard 3 is bad")
        return i

    StopRequested()  # a SIGTERM handler that only sets a flag, as an in-line training run leaves behind
    try:
        with worker_pool(2) as pool:
            list(pool.imap(fail, itertools.count()))  # workers are busy when it fails
    except ValueError as e:
        print("raised:", e)
""")


def test_a_failing_pool_terminates_even_under_a_flag_only_sigterm_handler():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "raised: shard 3 is bad"


def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_pool_map_keeps_order_in_line_and_on_workers(workers):
    with worker_pool(workers) as pool:
        assert (pool is None) == (workers == 1)
        assert pool_map(pool, _square, list(range(10))) == [x * x for x in range(10)]


def test_stop_requested_puts_back_the_handlers_it_found():
    before = {sig: signal.getsignal(sig) for sig in StopRequested.SIGNALS}
    stop = StopRequested()
    assert all(signal.getsignal(sig) == stop._set for sig in StopRequested.SIGNALS)
    stop.restore()
    assert {sig: signal.getsignal(sig) for sig in StopRequested.SIGNALS} == before
