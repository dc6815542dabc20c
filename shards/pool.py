"""The one way the shard tools fan work out to processes."""
from __future__ import annotations

import multiprocessing as mp
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.pool import Pool
from typing import Any


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    # A forked worker inherits the parent's Python signal handlers: a trainer's SIGTERM handler only sets a flag,
    # so Pool.terminate() would then wait forever for a worker that does not die.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it terminates the pool
    if initializer is not None:
        initializer(*initargs)


@contextmanager
def worker_pool(workers: int, initializer: Callable[..., None] | None = None,
                initargs: tuple = ()) -> Iterator[Pool | None]:
    """A fork pool of ``workers`` processes, or None for one worker (the caller runs in-line, after calling
    ``initializer`` itself). On success the workers finish and are joined; on an error they are terminated."""
    if workers <= 1:
        yield None
        return
    pool = mp.get_context("fork").Pool(workers, _start_worker, (initializer, initargs))
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def pool_map(pool: Pool | None, fn: Callable[[Any], Any], items: list, chunksize: int = 1) -> list:
    """``fn`` over ``items`` in order, on ``pool`` or in-line."""
    return pool.map(fn, items, chunksize=chunksize) if pool is not None else list(map(fn, items))
