"""Pre-fork worker processes for ``searchrl serve --workers N``.

The parent loads the index and binds the socket, then forks N children that each run their own
event loop and accept on the shared socket; index pages are shared copy-on-write. The parent
restarts a child that dies and, on SIGTERM / SIGINT, stops all children and returns. POSIX only.
Left out: graceful reload, per-worker CPU pinning, Windows.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Callable

logger = logging.getLogger(__name__)


def _fork_worker(run) -> int:
    pid = os.fork()
    if pid == 0:  # child: default signal handling, serve, never return into the parent's code
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        code = 0
        try:
            run()
        except BaseException:  # noqa: BLE001 - logged, then the child exits
            logger.exception("retrieval worker %d failed", os.getpid())
            code = 1
        finally:
            os._exit(code)
    return pid


def supervise(sock: socket.socket, workers: int, run: Callable[[], None]) -> None:
    """Fork ``workers`` children running ``run``; restart any that dies; stop all on a signal."""
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    children = {_fork_worker(run) for _ in range(workers)}
    try:
        while not stopping:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                pid = 0
            if pid and pid in children:
                children.discard(pid)
                logger.warning("retrieval worker %d exited (status %d); starting another", pid, status)
                time.sleep(0.5)
                children.add(_fork_worker(run))
            elif not pid:
                time.sleep(0.2)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in children:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        for s, h in old.items():
            signal.signal(s, h)
    logger.info("retrieval server stopped (signal %d)", stopping[0])


