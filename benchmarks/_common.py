"""Helpers shared by the benchmark scripts: JSON-line output, machine load, paths, a load generator.

Every benchmark prints one JSON object a line; :func:`emit` adds the time, the 1-minute load
average (the benchmark machines are often shared, so a figure is only meaningful next to it) and
the CPU count. :func:`run_load` is a small closed-loop load generator: N client threads, bounded
in time and count, reporting queries/s, latency percentiles and errors; :class:`ServerProcess`
runs ``searchrl serve`` as a child process on 127.0.0.1 and a free port. Left out: plotting and
result storage (redirect stdout to keep the lines).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``<repo>/../shared/data`` when it exists (optional real data, never part of the repo)."""
    path = REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


def machine() -> dict:
    """Load average (1 min) and CPU count, to print next to every figure."""
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"load1": load, "cpus": os.cpu_count()}


def emit(row: dict) -> dict:
    """Print ``row`` as one JSON line (with time and machine load) and return it."""
    out = {**row, **machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(json.dumps(out), flush=True)
    return out


def log(msg: str) -> None:
    """Progress note on stderr (stdout carries only JSON lines)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MiB (``ru_maxrss`` is KiB on Linux)."""
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


_PORTS_GIVEN: set[int] = set()
_PORTS_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` and that this process has not handed out
    before: the kernel may offer a port again until its first taker binds it, so two servers
    started back to back could otherwise be given the same one."""
    with _PORTS_LOCK:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _PORTS_GIVEN:
                _PORTS_GIVEN.add(port)
                return port


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; None for no values.

    >>> percentile([1, 2, 3, 4], 50)
    2.5
    >>> percentile([5.0], 99)
    5.0
    """
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def int_list(text: str) -> list[int]:
    """``"1,64"`` -> ``[1, 64]`` (also accepts ``100k`` / ``1M``).

    >>> int_list("1,64,100k,1M")
    [1, 64, 100000, 1000000]
    """
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        out.append(int(float(part.rstrip("km")) * mult))
    return out


def str_list(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def run_load(call, queries: list[str], batch: int, clients: int, duration: float, max_queries: int) -> dict:
    """``clients`` threads calling ``call(client, batch_of_queries)`` until time or count runs out."""
    lock = threading.Lock()
    state = {"sent": 0, "done": 0, "errors": 0, "first_error": None}
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    def worker(cid: int) -> None:
        pos = (cid * 997 * batch) % len(queries)
        while time.perf_counter() < deadline:
            with lock:
                if state["sent"] + batch > max_queries:
                    return
                state["sent"] += batch
            chunk = [queries[(pos + i) % len(queries)] for i in range(batch)]
            pos = (pos + batch) % len(queries)
            t0 = time.perf_counter()
            try:
                out = call(cid, chunk)
                ok = len(out) == batch
                err = None if ok else f"got {len(out)} result lists for {batch} queries"
            except Exception as e:  # noqa: BLE001 - counted, not raised
                ok, err = False, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    latencies.append(dt)
                    state["done"] += batch
                else:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or err[:300]

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    t0, c0 = time.perf_counter(), cpu_seconds()
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    wall = time.perf_counter() - t0
    return {
        "requests": len(latencies), "queries": state["done"], "errors": state["errors"],
        "first_error": state["first_error"], "seconds": round(wall, 2),
        "qps": round(state["done"] / wall, 1), "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
        "bench_cpu_s": round(cpu_seconds() - c0, 2),
    }  # fmt: skip


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class ServerProcess:
    """``searchrl serve --index DIR`` in a child process on 127.0.0.1 and a free port.

    ``launcher`` replaces ``[python, -m, searchrl.cli]`` (e.g. a script that patches the server
    before calling ``searchrl.cli.main``, to measure a proposed change).
    """

    def __init__(
        self, index: Path, log_path: Path, startup_s: float = 300.0, launcher: list[str] | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [*(launcher or [sys.executable, "-m", "searchrl.cli"]), "serve", "--index", str(index),
               "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait(startup_s, log_path)

    def _wait(self, startup_s: float, log_path: Path) -> None:
        import httpx

        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"searchrl serve exited with {self.proc.returncode}; see {log_path}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"searchrl serve did not answer /health within {startup_s:.0f}s; see {log_path}")

    def cpu_seconds(self) -> float | None:
        return proc_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
