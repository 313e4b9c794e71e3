"""``serve --workers N``: N gateway processes on one port, each a cluster node.

Every worker binds the port with ``SO_REUSEPORT`` and the kernel spreads new
connections over them; a session lives in one worker and a bot that lands on another
is handed over through Redis like a bot that moved between machines. The supervisor
only starts the workers, passes SIGTERM and SIGINT on (each drains and suspends its
sessions), and restarts a worker that died (its sessions are adopted by the others
meanwhile), backing off if it keeps dying. Workers get SIGTERM if the supervisor itself
dies.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from ..config import Settings

logger = logging.getLogger("gateway.supervisor")

#: A worker that dies sooner than this after its start counts towards the back-off.
STABLE_AFTER = 10.0
MAX_BACKOFF = 30.0


def worker_count(settings: Settings) -> int:
    """``workers``, or one per core in cluster mode (the automatic value)."""
    if settings.workers:
        return settings.workers
    return (os.cpu_count() or 1) if settings.redis_url else 1


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def worker_env(settings: Settings, index: int, n: int, port: int) -> dict[str, str]:
    """A worker's environment: one process, its own node name, its share of the cores
    for recognition (unless set), the shared port."""
    base = settings.node_id or socket.gethostname()
    env = {
        **os.environ,
        "GATEWAY_WORKERS": "1",
        "GATEWAY_NODE_ID": f"{base}-w{index}",
        "GATEWAY_PORT": str(port),
    }
    if not settings.asr_threads:
        env["GATEWAY_ASR_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    return env


def supervise(settings: Settings, argv: list[str]) -> int:
    """Run ``n`` workers until a signal; returns the exit status."""
    n = worker_count(settings)
    port = settings.port or free_port(settings.host)
    command = [sys.executable, "-m", "gateway", "serve", *worker_argv(argv)]
    stopping = False

    def start(i: int) -> subprocess.Popen[bytes]:
        env = worker_env(settings, i, n, port)
        return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in workers.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    workers: dict[int, subprocess.Popen[bytes]] = {}
    started: dict[int, float] = {}
    backoff: dict[int, float] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    logger.info("starting %d workers on port %d", n, port)
    for i in range(n):
        workers[i], started[i], backoff[i] = start(i), time.monotonic(), 0.0
    status = 0
    while workers:
        time.sleep(0.2)
        for i, proc in list(workers.items()):
            code = proc.poll()
            if code is None:
                continue
            if stopping:
                del workers[i]
                status = status or code
                continue
            lived = time.monotonic() - started[i]
            backoff[i] = 0.0 if lived > STABLE_AFTER else min(MAX_BACKOFF, 2 * backoff[i] or 1.0)
            logger.error("worker %d exited with %s; restarting in %.0f s", i, code, backoff[i])
            _sleep_unless(lambda: stopping, backoff[i])
            if not stopping:
                workers[i], started[i] = start(i), time.monotonic()
    return status


def _die_with_parent() -> None:
    """In the worker before it runs: a SIGTERM when the supervisor dies, even killed with
    SIGKILL, so no worker outlives it holding the port (Linux; elsewhere a no-op)."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _sleep_unless(stop: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop():
        time.sleep(0.1)


def worker_argv(argv: list[str]) -> list[str]:
    """The worker's command line: the supervisor's, without ``--workers``/``--port``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--workers", "--port", "--node-id"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out
