"""Soak and load test of the retrieval server: real `searchrl serve` processes on loopback, N
closed-loop clients for T seconds, mixed batch sizes, bad requests interleaved.

Good requests go through :class:`HttpRetriever` over every server URL (round-robin, failover);
every ``--bad-every``-th request of a client is a bad one sent raw (malformed JSON, unknown field,
topk 0, too many queries, a body over the limit, a missing or wrong API key) and must get a 4xx.
Prints one JSON line: good requests, errors (any failed good request, any bad request not answered
4xx), p50/p99 latency, and the servers' RSS after warm-up and at the end (growth in percent).

    python benchmarks/soak.py --servers 1 --clients 32 --seconds 60          # the soak
    python benchmarks/soak.py --servers 2 --clients 16 --seconds 30          # the 2-server load test

Left out: TLS, remote machines (loopback only), and latency targets (the figure is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, emit, free_port, log, percentile  # noqa: E402

WORDS = ("river city king war island song battle river empire queen mountain lake novel painter "
         "bridge tower castle poet desert forest harbor temple garden valley prince ocean").split()
BATCHES = (1, 4, 16, 64)


def make_index(folder: Path, passages: int = 2000, seed: int = 0) -> Path:
    """A BM25 index over ``passages`` deterministic pseudo-passages (built once per folder)."""
    from searchrl.retrieval.index import build_index

    out = folder / f"bm25-{passages}"
    if (out / "manifest.json").exists():
        return out
    rng = random.Random(seed)
    corpus = folder / f"corpus-{passages}.jsonl"
    with open(corpus, "w") as f:
        for i in range(passages):
            text = " ".join(rng.choice(WORDS) + str(rng.randrange(50)) for _ in range(40))
            f.write(json.dumps({"id": str(i), "contents": f'"Doc {i}"\n{text}'}) + "\n")
    return build_index(corpus, "bm25", out, show_progress=False)


class Server:
    """``searchrl serve`` as a child process on 127.0.0.1; ``extra`` adds CLI flags."""

    def __init__(self, index: Path, *extra: str, port: int | None = None, log_path: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="searchrl-serve-", suffix=".log")[1])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "searchrl.cli", "serve", "--index", str(index), "--host", "127.0.0.1",
               "--port", str(self.port), *extra]
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 120.0, headers: dict | None = None) -> "Server":
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"searchrl serve exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0, headers=headers).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"searchrl serve did not answer within {timeout:.0f}s: {self.log()[-2000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        """RSS of the server and its worker processes, MiB."""
        import psutil

        p = psutil.Process(self.proc.pid)
        procs = [p, *p.children(recursive=True)]
        return sum(q.memory_info().rss for q in procs) / 2**20

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def bad_requests(max_queries: int, max_body: int, api_key: str | None) -> list[tuple[str, dict, bytes]]:
    """``(name, headers, body)`` of requests that must each get a 4xx answer."""
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    js = {"Content-Type": "application/json", **auth}
    bad = [
        ("malformed-json", js, b'{"queries": ["a"'),
        ("not-utf8", js, b'{"queries": ["\xff\xfe"]}'),
        ("unknown-field", js, b'{"queries": ["a"], "k": 3}'),
        ("topk-0", js, b'{"queries": ["a"], "topk": 0}'),
        ("query-not-string", js, b'{"queries": [1, 2]}'),
        ("too-many-queries", js, json.dumps({"queries": ["river"] * (max_queries + 1)}).encode()),
        ("body-too-large", js, b'{"queries": ["' + b"a" * (max_body + 10) + b'"]}'),
    ]
    if api_key:
        bad += [("no-key", {"Content-Type": "application/json"}, b'{"queries": ["a"]}'),
                ("wrong-key", {"Content-Type": "application/json", "Authorization": "Bearer nope"},
                 b'{"queries": ["a"]}')]
    return bad


def run_soak(urls: list[str], clients: int, seconds: float, *, bad_every: int = 0, warmup: float = 2.0,
             rss=None, api_key: str | None = None, max_queries: int = 512, max_body: int = 1_000_000,
             on_tick=None) -> dict:
    """Closed-loop clients for ``seconds``; see the module docstring. ``rss()`` samples memory."""
    import httpx

    from searchrl.retrieval.client import HttpRetriever

    retriever = HttpRetriever(urls, timeout=30, retries=3, backoff=0.1, api_key=api_key)
    bad = bad_requests(max_queries, max_body, api_key)
    lock = threading.Lock()
    stats = {"good": 0, "queries": 0, "errors": 0, "bad": 0, "bad_4xx": 0, "first_error": None}
    latencies: list[float] = []
    t_start = time.perf_counter()
    deadline = t_start + seconds

    def fail(msg: str) -> None:
        with lock:
            stats["errors"] += 1
            stats["first_error"] = stats["first_error"] or msg[:300]

    def worker(cid: int) -> None:
        rng = random.Random(cid)
        raw = httpx.Client(timeout=30)
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            if bad_every and n % bad_every == 0:
                name, headers, body = bad[rng.randrange(len(bad))]
                try:
                    code = raw.post(urls[n % len(urls)] + "/retrieve", content=body, headers=headers).status_code
                except httpx.TransportError as e:
                    fail(f"bad request {name}: {type(e).__name__}: {e}")
                    continue
                with lock:
                    stats["bad"] += 1
                    stats["bad_4xx"] += 400 <= code < 500
                if not 400 <= code < 500:
                    fail(f"bad request {name} got HTTP {code}")
                continue
            batch = BATCHES[rng.randrange(len(BATCHES))]
            queries = [f"{rng.choice(WORDS)}{rng.randrange(50)} {rng.choice(WORDS)}" for _ in range(batch)]
            t0 = time.perf_counter()
            try:
                out = retriever.search(queries, k=rng.choice((1, 3, 5)))
                ok = len(out) == batch and all(out)
            except Exception as e:  # noqa: BLE001 - counted
                fail(f"good request: {type(e).__name__}: {e}")
                continue
            dt = time.perf_counter() - t0
            if not ok:
                fail("good request: wrong number of result lists or an empty one")
                continue
            with lock:
                stats["good"] += 1
                stats["queries"] += batch
                if t0 - t_start >= warmup:
                    latencies.append(dt)
        raw.close()

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    rss_warm = None
    if rss is not None:
        time.sleep(min(warmup, seconds))
        rss_warm = rss()
    if on_tick is not None:
        on_tick()
    for t in threads:
        t.join(seconds + 120)
    wall = time.perf_counter() - t_start
    rss_end = rss() if rss is not None else None
    retriever.close()
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    out = {**stats, "clients": clients, "servers": len(urls), "seconds": round(wall, 1),
           "requests_per_s": round(stats["good"] / wall, 1), "p50_ms": ms(percentile(latencies, 50)),
           "p99_ms": ms(percentile(latencies, 99))}
    if rss_warm is not None:
        out.update(rss_warm_mb=round(rss_warm, 1), rss_end_mb=round(rss_end, 1),
                   rss_growth_pct=round(100 * (rss_end - rss_warm) / rss_warm, 2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="--workers of each server")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds before the first RSS sample")
    ap.add_argument("--bad-every", type=int, default=5, help="every n-th request of a client is a bad one")
    ap.add_argument("--passages", type=int, default=20_000)
    ap.add_argument("--api-key", help="serve with this key (clients send it)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "searchrl-soak")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    index = make_index(args.work, args.passages)
    extra = ["--workers", str(args.workers)] + (["--api-key", args.api_key] if args.api_key else [])
    servers = [Server(index, *extra) for _ in range(args.servers)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    try:
        for s in servers:
            s.wait(headers=headers)
        log(f"{len(servers)} server(s) up; {args.clients} clients for {args.seconds:.0f}s")
        row = run_soak([s.url for s in servers], args.clients, args.seconds, bad_every=args.bad_every,
                       warmup=args.warmup, rss=lambda: sum(s.rss_mb() for s in servers), api_key=args.api_key)
        row["alive_after"] = all(s.proc.poll() is None for s in servers)
    finally:
        for s in servers:
            s.stop()
    emit({"bench": "soak", "passages": args.passages, "workers": args.workers, **row})
    return 0 if row["errors"] == 0 and row["alive_after"] else 1


if __name__ == "__main__":
    sys.exit(main())
