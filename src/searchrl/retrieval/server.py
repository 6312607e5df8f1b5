"""HTTP retrieval server: the Search-R1 ``POST /retrieve`` contract over any :class:`Retriever`.

Request ``{"queries": [...], "topk": 3, "return_scores": false}`` (``topk`` defaults to 3 and
``return_scores`` to false, as in the original server); response ``{"result": [[item, ...], ...]}``,
one list per query, best first, where an item is ``{"document": {"id", "contents"}, "score": s}``
with ``return_scores`` and just the document object without it. An empty ``queries`` list is valid
and gets ``{"result": []}``. ``GET /health`` answers ``{"status": "ok", "passages": n | null,
"kind": ..., "max_topk": ..., "max_queries": ...}``.

Bad input gets a 4xx answer ``{"error": {"message": ..., "field": ...}}`` (400 malformed JSON,
413 body too large, 422 anything else); a retriever failure gets 500 with its message. The server
never dies on a request.

Retriever calls run on one worker thread, never on the event loop. Concurrent requests are
coalesced: those that arrive while a retriever call runs (and, if ``batch_window_ms`` > 0, within
that window of the first one) are merged, up to ``max_batch_queries`` queries, into one
``retriever.search`` call with the largest ``topk`` of the batch; each request gets its own slice
cut to its own ``topk``. If a merged call fails, its requests are retried one by one so that one bad
request does not fail the others. The default window is 0 (merge only what queued up): a window
added latency to lone requests without raising throughput (README, retrieval figures).

Access: the server binds loopback by default. Any other bind address needs an API key (``api_key``,
``--api-key`` or the ``SEARCHRL_API_KEY`` environment variable) unless ``insecure=True`` /
``--insecure`` says otherwise (:func:`bind_policy` decides; the log says which). With a key every
request must carry ``Authorization: Bearer KEY`` or gets 401, checked before the body is read. The
body limit (``max_body_bytes``, 413) is enforced from ``Content-Length`` and while streaming, before
any JSON parsing; the batch limit (``max_queries``) right after parsing.

``workers=N`` forks N server processes after the index is loaded (they share its memory pages
copy-on-write and accept on one listening socket); the parent restarts a worker that dies and
stops them all on SIGTERM / SIGINT.

Left out: TLS (put a TLS-terminating proxy in front), per-client rate limits, and streaming.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from searchrl.errors import ConfigError, SearchRLError
from searchrl.retrieval.access import (
    API_KEY_ENV,
    DEFAULT_RETURN_SCORES,
    DEFAULT_TOPK,
    NOT_BLANK,
    authorized,
    bind_policy,
    retrieve_openapi,
    unauthorized,
)
from searchrl.retrieval.base import Retriever
from searchrl.types import Passage

logger = logging.getLogger(__name__)

ALLOWED_FIELDS = ("queries", "topk", "return_scores")
_NOT_BLANK = re.compile(NOT_BLANK)  # the same rule as the published schema's pattern
__all__ = ["BackgroundServer", "Batcher", "create_app", "parse_request", "serve", "bind_policy", "API_KEY_ENV"]


class RequestError(Exception):
    """A request the client must fix; becomes a 4xx JSON error."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


@dataclass(frozen=True)
class RetrieveRequest:
    queries: list[str]
    topk: int = DEFAULT_TOPK
    return_scores: bool = DEFAULT_RETURN_SCORES


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def parse_request(body: bytes, *, max_topk: int, max_queries: int) -> RetrieveRequest:
    """Validate a raw ``/retrieve`` body; raise :class:`RequestError` naming the first problem.

    >>> parse_request(b'{"queries": ["a"]}', max_topk=10, max_queries=5)
    RetrieveRequest(queries=['a'], topk=3, return_scores=False)
    >>> parse_request(b'{"queries": ["a", " "]}', max_topk=10, max_queries=5)
    Traceback (most recent call last):
    ...
    searchrl.retrieval.server.RequestError: queries[1] is empty or whitespace
    >>> parse_request(b'{"queries": ["a"], "topk": 2.0}', max_topk=10, max_queries=5).topk
    2
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"request body must be a JSON object, got {_type_name(data)}")
    unknown = sorted(set(data) - set(ALLOWED_FIELDS))
    if unknown:
        raise RequestError(
            422,
            f"unknown field(s): {', '.join(unknown)} (allowed: {', '.join(ALLOWED_FIELDS)})",
            unknown[0],
        )
    if "queries" not in data:
        raise RequestError(422, "missing required field 'queries' (a list of strings)", "queries")
    queries = data["queries"]
    if not isinstance(queries, list):
        raise RequestError(
            422, f"'queries' must be a list of strings, got {_type_name(queries)}", "queries"
        )
    if len(queries) > max_queries:
        raise RequestError(
            422, f"too many queries: {len(queries)} > max_queries={max_queries}", "queries"
        )
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            msg = f"queries[{i}] must be a string, got {_type_name(q)}"
            raise RequestError(422, msg, "queries")
        if not _NOT_BLANK.search(q):
            raise RequestError(422, f"queries[{i}] is empty or whitespace", "queries")
    topk = data.get("topk", DEFAULT_TOPK)
    if isinstance(topk, float) and topk.is_integer():  # JSON Schema's integer includes 3.0
        topk = int(topk)
    if not isinstance(topk, int) or isinstance(topk, bool):
        raise RequestError(422, f"'topk' must be an integer, got {_type_name(topk)}", "topk")
    if not 1 <= topk <= max_topk:
        raise RequestError(422, f"'topk' must be between 1 and {max_topk}, got {topk}", "topk")
    rs = data.get("return_scores", DEFAULT_RETURN_SCORES)
    if not isinstance(rs, bool):
        raise RequestError(
            422, f"'return_scores' must be true or false, got {_type_name(rs)}", "return_scores"
        )
    return RetrieveRequest(list(queries), topk, rs)


def format_result(hits: list[list[Passage]], return_scores: bool) -> list[list[dict]]:
    """Turn passages into the contract's items (document with score, or the bare document)."""
    if return_scores:
        return [
            [{"document": p.to_document(), "score": float(p.score or 0.0)} for p in row]
            for row in hits
        ]
    return [[p.to_document() for p in row] for row in hits]


@dataclass
class _Job:
    queries: list[str]
    k: int
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Runs retriever calls on one worker thread, merging concurrent jobs into one call.

    ``coalesce=False`` runs each job as its own call (still one at a time, still off the loop).
    ``calls`` and ``queries`` count retriever calls and the queries they carried.
    """

    def __init__(
        self,
        retriever: Retriever,
        *,
        window_s: float = 0.0,
        max_batch_queries: int = 256,
        coalesce: bool = True,
    ):
        self.retriever = retriever
        self.window_s = max(0.0, window_s)
        self.max_batch_queries = max(1, max_batch_queries)
        self.coalesce = coalesce
        self.calls = 0
        self.queries = 0
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[_Job] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        """Top-``k`` passages per query; raises whatever the retriever raised."""
        if not queries:
            return []
        self._bind_loop()
        if not self.coalesce:
            async with self._lock:
                return await self._run(queries, k)
        job = _Job(queries, k, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wake.set()
        return await job.future

    def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _bind_loop(self) -> None:
        """Create the loop-bound state on first use (or when the app moves to a new loop)."""
        loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="searchrl-retrieve")
        if self._loop is not loop:
            self._loop, self._wake, self._lock = loop, asyncio.Event(), asyncio.Lock()
            self._pending, self._task = deque(), None
        if self.coalesce and (self._task is None or self._task.done()):
            self._task = loop.create_task(self._worker(), name="searchrl-batcher")

    async def _run(self, queries: list[str], k: int) -> list[list[Passage]]:
        self.calls += 1
        self.queries += len(queries)
        loop = asyncio.get_running_loop()
        hits = await loop.run_in_executor(self._executor, self.retriever.search, queries, k)
        if len(hits) != len(queries):
            raise RuntimeError(
                f"retriever returned {len(hits)} result lists for {len(queries)} queries"
            )
        return hits

    def _take(self) -> list[_Job]:
        """Pop jobs in arrival order while they fit ``max_batch_queries`` (at least one)."""
        batch, total = [], 0
        while self._pending:
            n = len(self._pending[0].queries)
            if batch and total + n > self.max_batch_queries:
                break
            batch.append(self._pending.popleft())
            total += n
        return batch

    async def _worker(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.window_s:
                await asyncio.sleep(self.window_s)  # let concurrent requests join the batch
            while self._pending:
                batch = [j for j in self._take() if not j.future.done()]  # drop cancelled
                if batch:
                    await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Job]) -> None:
        queries = [q for job in batch for q in job.queries]
        k = max(job.k for job in batch)
        try:
            hits = await self._run(queries, k)
        except Exception as e:  # noqa: BLE001 - handed to the requests
            if len(batch) == 1:
                _settle(batch[0], exc=e)
                return
            logger.warning("merged retriever call failed (%s); retrying its requests alone", e)
            for job in batch:
                try:
                    _settle(job, result=await self._run(job.queries, job.k))
                except Exception as e1:  # noqa: BLE001
                    _settle(job, exc=e1)
            return
        start = 0
        for job in batch:
            rows = hits[start : start + len(job.queries)]
            start += len(job.queries)
            _settle(job, result=[row[: job.k] for row in rows])


def _settle(job: _Job, result: Any = None, exc: BaseException | None = None) -> None:
    if job.future.done():
        return
    if exc is not None:
        job.future.set_exception(exc)
    else:
        job.future.set_result(result)


def describe_retriever(retriever: Retriever) -> tuple[int | None, str]:
    """``(number of passages or None, kind)`` from whatever the retriever exposes."""
    n = getattr(retriever, "num_passages", None)
    if n is None and hasattr(retriever, "__len__"):
        try:
            n = len(retriever)  # type: ignore[arg-type]
        except TypeError:
            n = None
    kind = getattr(retriever, "kind", None) or getattr(retriever, "name", None)
    return (int(n) if n is not None else None), str(kind or type(retriever).__name__)


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "field": field}}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body is {declared} bytes, more than {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    retriever: Retriever,
    *,
    max_topk: int = 100,
    max_queries: int = 512,
    max_body_bytes: int = 1_000_000,
    batch_window_ms: float = 0.0,
    max_batch_queries: int = 256,
    coalesce: bool = True,
    api_key: str | None = None,
) -> FastAPI:
    """A FastAPI app serving ``retriever`` (see the module docstring for the contract).

    ``api_key``: when set, every request needs ``Authorization: Bearer api_key`` (else 401).
    ``app.state.batcher`` is the :class:`Batcher` (its ``calls`` counter is handy in tests).
    """
    for name, value in (("max_topk", max_topk), ("max_queries", max_queries),
                        ("max_body_bytes", max_body_bytes)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    batcher = Batcher(
        retriever,
        window_s=batch_window_ms / 1000.0,
        max_batch_queries=max_batch_queries,
        coalesce=coalesce,
    )
    passages, kind = describe_retriever(retriever)

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="searchrl retrieval server", lifespan=lifespan)
    app.state.batcher = batcher
    _add_routes(app, batcher, api_key, max_topk, max_queries, max_body_bytes, passages, kind)
    return app


def _add_routes(app: FastAPI, batcher: "Batcher", api_key: str | None, max_topk: int, max_queries: int,
                max_body_bytes: int, passages: Any, kind: Any) -> None:
    """``/health``, ``/retrieve`` and the error shape of 404 / 405 (see :func:`create_app`)."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404 / 405 in the same error shape
        return _error(exc.status_code, str(exc.detail))

    @app.get("/health")
    async def health(request: Request):
        if not authorized(request, api_key):
            return unauthorized()
        return {
            "status": "ok",
            "passages": passages,
            "kind": kind,
            "max_topk": max_topk,
            "max_queries": max_queries,
        }

    @app.post("/retrieve", openapi_extra=retrieve_openapi(max_topk, max_queries))
    async def retrieve(request: Request):
        if not authorized(request, api_key):
            return unauthorized()
        try:
            body = await _read_body(request, max_body_bytes)
            req = parse_request(body, max_topk=max_topk, max_queries=max_queries)
        except RequestError as e:
            return _error(e.status, e.message, e.field)
        try:
            hits = await batcher.search(req.queries, req.topk)
        except Exception as e:  # noqa: BLE001 - the server must stay up
            logger.exception("retriever failed on %d queries", len(req.queries))
            return _error(500, f"retriever failed: {type(e).__name__}: {e}")
        # Rendered directly: FastAPI's generic encoder costs more CPU than the search at batch 64.
        body = json.dumps({"result": format_result(hits, req.return_scores)}, ensure_ascii=False)
        return Response(content=body.encode("utf-8"), media_type="application/json")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on accepted connections of
    # such sockets, and without it every response waits ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SearchRLError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _make_server(app, log_level: str):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on")
    return uvicorn.Server(config)


def serve(
    retriever: Retriever,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    log_level: str = "warning",
    api_key: str | None = None,
    insecure: bool = False,
    workers: int = 1,
    **opts: Any,
) -> None:
    """Serve ``retriever`` until interrupted (blocking). ``opts`` go to :func:`create_app`.

    ``api_key`` defaults to ``$SEARCHRL_API_KEY``; see :func:`bind_policy` for when one is needed.
    """
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    policy = bind_policy(host, api_key, insecure)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if policy == "insecure":
        logger.warning("binding %s WITHOUT authentication (--insecure): anyone who can reach the port "
                       "can query the index", host)
    else:
        logger.info("access: %s", "bearer API key required" if policy == "api-key" else
                    "loopback only, no API key")
    sock = _bind(host, port)
    logger.info("retrieval server listening on %s (POST /retrieve, GET /health), %d worker(s)",
                _url(sock, host), workers)
    try:
        if workers == 1:
            _make_server(create_app(retriever, api_key=api_key, **opts), log_level).run(sockets=[sock])
        else:
            from searchrl.retrieval.workers import supervise

            supervise(sock, workers, lambda: _make_server(
                create_app(retriever, api_key=api_key, **opts), log_level).run(sockets=[sock]))
    finally:
        sock.close()


class BackgroundServer:
    """Run the app in a daemon thread (tests, notebooks, an in-process eval).

    >>> class Echo:
    ...     def search(self, queries, k=3):
    ...         return [[Passage(q, q, q, 1.0)] for q in queries]
    >>> with BackgroundServer(create_app(Echo())) as srv:
    ...     srv.url.startswith("http://127.0.0.1:")
    True
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self._sock = _bind(host, port)
        self.url = _url(self._sock, host)
        self._server = _make_server(app, log_level)
        self._thread = threading.Thread(target=self._run, name="searchrl-server", daemon=True)

    def _run(self) -> None:
        self._server.run(sockets=[self._sock])

    def start(self, timeout: float = 10.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise SearchRLError(f"retrieval server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
