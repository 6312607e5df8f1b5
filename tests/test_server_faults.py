"""The retrieval server and client under faults, bad input, load and strangers (issue 14).

Everything runs on 127.0.0.1 (127.0.0.x for the loopback-policy checks); nothing binds or sends to
another address: the non-loopback rule is checked through :func:`bind_policy` and through
``serve`` / ``searchrl serve`` refusing *before* any socket is opened. Servers are real
``searchrl serve`` processes (benchmarks/soak.py's ``Server``) or in-thread ``BackgroundServer``s.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from searchrl.errors import ConfigError, RetrieverUnavailable, SearchRLError
from searchrl.retrieval.client import HttpRetriever
from searchrl.retrieval.server import BackgroundServer, bind_policy, create_app, serve
from searchrl.types import Passage

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).parents[1] / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


class Echo:
    kind = "echo"

    def __init__(self, tag: str = "a"):
        self.tag, self.calls = tag, 0

    def search(self, queries, k=3):
        self.calls += 1
        return [[Passage(f"{self.tag}{i}", "T", q, 1.0 - i) for i in range(k)] for q in queries]


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return soak.make_index(tmp_path_factory.mktemp("soak"), passages=300)


# ------------------------------------------------------------------------------ nobody let in
def test_bind_policy_decides_by_address_key_and_insecure():
    assert bind_policy("127.0.0.1", None) == "loopback"
    assert bind_policy("127.0.0.2", None) == "loopback"  # all of 127/8 is loopback
    assert bind_policy("::1", None) == "loopback"
    assert bind_policy("localhost", None) == "loopback"
    for host in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "example.org"):
        with pytest.raises(ConfigError, match="needs an API key.*--insecure"):
            bind_policy(host, None)
        assert bind_policy(host, "secret") == "api-key"
        assert bind_policy(host, None, insecure=True) == "insecure"


def test_serve_refuses_a_public_address_before_opening_a_socket(monkeypatch):
    opened = []
    monkeypatch.setattr(socket, "socket", lambda *a, **k: opened.append(a) or pytest.fail("socket opened"))
    monkeypatch.delenv("SEARCHRL_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="needs an API key"):
        serve(Echo(), host="0.0.0.0", port=1)
    assert opened == []


def test_the_log_says_which_access_mode(monkeypatch, caplog):
    """--insecure on 0.0.0.0 is allowed and logged as such, as are key and loopback modes; ``_bind``
    is stubbed, so nothing listens (a real `searchrl serve --api-key` runs in the short soak)."""
    from searchrl.retrieval import server as server_mod

    def no_bind(host, port):
        raise RuntimeError(f"stub: would bind {host}:{port}")

    monkeypatch.setattr(server_mod, "_bind", no_bind)
    monkeypatch.delenv("SEARCHRL_API_KEY", raising=False)
    with caplog.at_level("INFO", logger="searchrl.retrieval.server"), pytest.raises(RuntimeError, match="stub"):
        serve(Echo(), host="0.0.0.0", port=1, insecure=True)
    assert "WITHOUT authentication (--insecure)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="searchrl.retrieval.server"), pytest.raises(RuntimeError, match="stub"):
        serve(Echo(), host="0.0.0.0", port=1, api_key="k")
    assert "bearer API key required" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="searchrl.retrieval.server"), pytest.raises(RuntimeError, match="stub"):
        serve(Echo(), host="127.0.0.1", port=1)
    assert "loopback only, no API key" in caplog.text


def test_cli_serve_refuses_public_host_without_key(index, monkeypatch, capsys):
    from searchrl.cli import main

    monkeypatch.delenv("SEARCHRL_API_KEY", raising=False)
    monkeypatch.setattr("searchrl.retrieval.index.load_index", lambda *a, **k: pytest.fail("index loaded"))
    assert main(["serve", "--index", str(index), "--host", "0.0.0.0"]) == 2
    assert "needs an API key" in capsys.readouterr().err


def test_api_key_required_and_sent_by_the_client():
    with BackgroundServer(create_app(Echo(), api_key="s3cret")) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "s3cret"}):
            r = httpx.post(srv.url + "/retrieve", json={"queries": ["a"]}, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert httpx.get(srv.url + "/health", headers=headers).status_code == 401
        # refused before the body is read: a huge declared body still gets 401, not 413
        r = httpx.post(srv.url + "/retrieve", content=b"x" * 2_000_000)
        assert r.status_code == 401
        with HttpRetriever(srv.url, api_key="s3cret") as ok:
            assert ok.search(["q"], k=2)[0][0].id == "a0"
        with HttpRetriever(srv.url, retries=0) as no_key, pytest.raises(SearchRLError, match="HTTP 401.*api-key"):
            no_key.search(["q"])


def test_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("SEARCHRL_API_KEY", "envkey")
    with BackgroundServer(create_app(Echo(), api_key="envkey")) as srv:
        assert len(HttpRetriever(srv.url).search(["q"], k=1)) == 1  # the client read the variable


# ------------------------------------------------------------------------------ limits
def _raw_post(url: str, head: str, body: bytes = b"", wait: float = 5.0) -> tuple[int, float]:
    """Send a hand-written request; return (status, seconds to the answer)."""
    host, port = url.removeprefix("http://").split(":")
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        data = s.recv(65536)
    return int(data.split(b" ")[1]), time.perf_counter() - t0


def test_body_limit_is_enforced_before_the_body_arrives():
    with BackgroundServer(create_app(Echo(), max_body_bytes=1000)) as srv:
        # declares 1 GB and sends nothing: the answer must come at once, from the header alone
        status, seconds = _raw_post(srv.url, "POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                    "application/json\r\nContent-Length: 1000000000")
        assert status == 413 and seconds < 2.0
        # chunked (no length): cut off while streaming, once past the limit
        chunk = b'{"queries": ["' + b"a" * 3000
        status, _ = _raw_post(srv.url, "POST /retrieve HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked",
                              f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        assert status == 413
        r = httpx.post(srv.url + "/retrieve", json={"queries": ["a"] * 3})
        assert r.status_code == 200  # small bodies still pass


def test_batch_and_topk_limits():
    with BackgroundServer(create_app(Echo(), max_queries=4, max_topk=5)) as srv:
        r = httpx.post(srv.url + "/retrieve", json={"queries": ["a"] * 5})
        assert r.status_code == 422 and "max_queries=4" in r.json()["error"]["message"]
        assert httpx.post(srv.url + "/retrieve", json={"queries": ["a"], "topk": 6}).status_code == 422
        assert httpx.post(srv.url + "/retrieve", json={"queries": ["a"] * 4, "topk": 5}).status_code == 200


def test_limits_must_be_positive():
    with pytest.raises(ConfigError, match="max_body_bytes"):
        create_app(Echo(), max_body_bytes=0)


# ------------------------------------------------------------------------------ several servers
def test_round_robin_and_failover_between_two_servers():
    a, b = Echo("a"), Echo("b")
    with BackgroundServer(create_app(a)) as sa, BackgroundServer(create_app(b)) as sb:
        client = HttpRetriever(f"{sa.url},{sb.url}", retries=1, backoff=0.01)
        ids = {client.search(["q"], k=1)[0][0].id for _ in range(6)}
        assert ids == {"a0", "b0"} and a.calls == 3 and b.calls == 3  # round-robin
        sb.stop()
        for _ in range(6):  # b is gone: every request still answered, by a
            assert client.search(["q"], k=1)[0][0].id == "a0"
        assert a.calls == 9


def test_client_waits_for_a_restarting_server():
    port = soak.free_port()
    client = HttpRetriever(f"http://127.0.0.1:{port}", retries=0, backoff=0.05, max_delay=0.2, wait=20)
    result, started = {}, threading.Event()

    def call():
        started.set()
        t0 = time.perf_counter()
        result["hits"] = client.search(["q"], k=1)
        result["seconds"] = time.perf_counter() - t0

    t = threading.Thread(target=call)
    t.start()
    started.wait()
    time.sleep(1.5)  # the server is down for a while ...
    with BackgroundServer(create_app(Echo("late")), port=port):  # ... then comes back on its port
        t.join(20)
    assert result["hits"][0][0].id == "late0" and result["seconds"] >= 1.0


def test_client_gives_up_after_the_wait_with_a_clear_error():
    port = soak.free_port()
    client = HttpRetriever(f"http://127.0.0.1:{port}", retries=0, backoff=0.05, max_delay=0.1, wait=0.6)
    t0 = time.perf_counter()
    with pytest.raises(RetrieverUnavailable, match=f"127.0.0.1:{port}.*unavailable after .*attempt"):
        client.search(["q"])
    assert 0.6 <= time.perf_counter() - t0 < 5


def test_wait_from_the_environment(monkeypatch):
    monkeypatch.setenv("SEARCHRL_RETRIEVER_WAIT", "7.5")
    assert HttpRetriever("127.0.0.1:1").wait == 7.5
    monkeypatch.setenv("SEARCHRL_RETRIEVER_WAIT", "soon")
    with pytest.raises(SearchRLError, match="SEARCHRL_RETRIEVER_WAIT"):
        HttpRetriever("127.0.0.1:1")


def _cpu(server) -> float:
    import psutil

    t = psutil.Process(server.proc.pid).cpu_times()
    return t.user + t.system


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The kernel may offer the same free port to two calls in a row (the first server has not bound
    it yet); the servers of one test would then share it and one would die or go unused."""
    import sys
    from types import SimpleNamespace

    common = sys.modules["_common"]
    offered = iter([5001, 5001, 5001, 5002])

    class Sock:
        def __init__(self, *args):
            self.port = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    fake = SimpleNamespace(socket=Sock, AF_INET=socket.AF_INET, SOCK_STREAM=socket.SOCK_STREAM)
    monkeypatch.setattr(common, "socket", fake)
    monkeypatch.setattr(common, "_PORTS_GIVEN", set())
    assert [soak.free_port(), soak.free_port()] == [5001, 5002]


def test_two_servers_sixteen_clients_zero_errors_even_when_one_is_killed(index):
    servers = [soak.Server(index) for _ in range(2)]  # started together
    try:
        for s in servers:
            s.wait()
        cpu0 = [_cpu(s) for s in servers]
        row = soak.run_soak([s.url for s in servers], clients=16, seconds=4, warmup=0.5)
        cpu1 = [_cpu(s) for s in servers]
        assert row["errors"] == 0, row["first_error"]
        assert row["good"] > 16
        assert all(c1 > c0 for c0, c1 in zip(cpu0, cpu1)), "round-robin should load both servers"
        # the same load while one server is SIGKILLed halfway: failover, still zero errors
        killer = threading.Timer(1.5, lambda: servers[1].proc.send_signal(signal.SIGKILL))
        killer.start()
        row = soak.run_soak([s.url for s in servers], clients=16, seconds=3, warmup=0.5)
        killer.join()
    finally:
        for s in servers:
            s.stop()
    assert servers[1].proc.returncode == -signal.SIGKILL
    assert row["errors"] == 0, row["first_error"]
    assert row["good"] > 16


def test_workers_share_one_port_and_a_dead_worker_is_replaced(index):
    import psutil

    srv = soak.Server(index, "--workers", "2").wait()
    try:
        parent = psutil.Process(srv.proc.pid)
        deadline = time.time() + 30
        while len(parent.children()) < 2 and time.time() < deadline:
            time.sleep(0.1)
        kids = parent.children()
        assert len(kids) == 2
        kids[0].kill()

        def live_workers() -> list[int]:
            # one snapshot per look: two separate children() calls can straddle the reaping of the
            # killed worker's zombie (counted by the first, gone from the second) and pass too early
            pids = []
            for c in parent.children():
                try:
                    if c.status() != psutil.STATUS_ZOMBIE:
                        pids.append(c.pid)
                except psutil.NoSuchProcess:
                    pass
            return pids

        deadline = time.time() + 60
        pids = live_workers()
        while time.time() < deadline and (len(pids) < 2 or kids[0].pid in pids):
            time.sleep(0.1)
            pids = live_workers()
        assert len(pids) == 2 and kids[0].pid not in pids, (pids, srv.log()[-2000:])
        assert "starting another" in srv.log()
        row = soak.run_soak([srv.url], clients=4, seconds=2, warmup=0.2)
        assert row["errors"] == 0, row["first_error"]
    finally:
        code = srv.stop()
    assert code == 0 and not any(p.is_running() and p.status() != "zombie" for p in kids[1:])


# ------------------------------------------------------------------------------ load
def test_short_soak_mixed_batches_and_bad_requests(index):
    """The normal-suite version of benchmarks/soak.py: 8 clients, 8 s, every 3rd request bad."""
    srv = soak.Server(index, "--api-key", "soak").wait(headers={"Authorization": "Bearer soak"})
    try:
        row = soak.run_soak([srv.url], clients=8, seconds=8, bad_every=3, warmup=3.0, rss=srv.rss_mb,
                            api_key="soak")
        alive = srv.proc.poll() is None
    finally:
        srv.stop()
    assert row["errors"] == 0, row["first_error"]
    assert row["bad"] > 10 and row["bad_4xx"] == row["bad"]
    assert row["p99_ms"] is not None and alive
    assert abs(row["rss_growth_pct"]) <= 10, row


@pytest.mark.slow
def test_soak_32_clients_60_seconds(index):
    srv = soak.Server(index).wait()
    try:
        row = soak.run_soak([srv.url], clients=32, seconds=60, bad_every=5, warmup=10.0, rss=srv.rss_mb)
        alive = srv.proc.poll() is None
    finally:
        srv.stop()
    print(json.dumps(row))
    assert row["errors"] == 0, row["first_error"]
    assert row["bad_4xx"] == row["bad"] > 0 and alive
    assert abs(row["rss_growth_pct"]) <= 10, row
