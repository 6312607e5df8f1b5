"""``HttpRetriever``: the :class:`Retriever` interface over a Search-R1 ``/retrieve`` server.

Speaks the contract served by :mod:`searchrl.retrieval.server` (and by the original Search-R1
server): it always asks for scores and turns each item back into a :class:`Passage`. Long query
lists are split into chunks of ``max_batch``.

Several servers: ``url`` may be a list or a comma-separated string. Requests go round-robin; a
connection error, timeout or 5xx answer fails over to the next server at once; when every server
failed in a round, the client sleeps ``backoff * 2**(round - 1)`` seconds (at most ``max_delay``)
and tries the next round. It gives up after ``retries`` extra rounds *and* ``wait`` seconds
(``wait`` defaults to ``$SEARCHRL_RETRIEVER_WAIT`` or 0) with :class:`RetrieverUnavailable` naming
the servers and the last error. A 4xx answer is the caller's fault and raises
:class:`SearchRLError` with the server's message at once (401: the API key). ``api_key`` (default
``$SEARCHRL_API_KEY``) is sent as ``Authorization: Bearer KEY``.

Left out: health-based ejection of a bad server (each request tries them in turn) and request
signing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from typing import Any

import httpx

from searchrl.errors import RetrieverUnavailable, SearchRLError
from searchrl.types import Passage

logger = logging.getLogger(__name__)

_RETRYABLE = (httpx.TransportError,)  # connect/read/write errors, timeouts, protocol errors
WAIT_ENV = "SEARCHRL_RETRIEVER_WAIT"
API_KEY_ENV = "SEARCHRL_API_KEY"


def _urls(url: str | list[str] | tuple[str, ...]) -> list[str]:
    """One or several server URLs (a list, or one string with commas).

    >>> _urls("127.0.0.1:8000, http://127.0.0.1:8001/retrieve")
    ['http://127.0.0.1:8000', 'http://127.0.0.1:8001']
    """
    parts = url.split(",") if isinstance(url, str) else list(url)
    urls = [_base_url(u) for u in parts if str(u).strip()]
    if not urls:
        raise SearchRLError(f"no retrieval server URL in {url!r}")
    return urls


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SearchRLError(f"${name} must be a number of seconds, got {raw!r}") from None


def _base_url(url: str) -> str:
    """Accept ``http://host:port``, a trailing slash, or the full ``.../retrieve`` URL.

    >>> _base_url("http://127.0.0.1:8000/retrieve")
    'http://127.0.0.1:8000'
    >>> _base_url("localhost:8000/")
    'http://localhost:8000'
    """
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    for suffix in ("/retrieve", "/health"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def _body(queries: list[str], k: int) -> dict:
    return {"queries": queries, "topk": k, "return_scores": True}


def _server_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
        if isinstance(data.get("error"), dict) and data["error"].get("message"):
            return str(data["error"]["message"])
        return str(data.get("detail") or resp.text[:500])
    except (ValueError, AttributeError):
        return resp.text[:500]


def _parse_result(data: Any, n: int, url: str) -> list[list[Passage]]:
    """Contract items (with or without scores) -> passages; a bad shape raises SearchRLError."""
    try:
        rows = data["result"]
        if not isinstance(rows, list) or len(rows) != n:
            raise ValueError(f"expected {n} result lists, got {len(rows)}")
        out = []
        for row in rows:
            hits = []
            for item in row:
                doc = item.get("document", item)
                score = item.get("score") if "document" in item else None
                hits.append(
                    Passage.from_contents(
                        str(doc["id"]), doc["contents"], None if score is None else float(score)
                    )
                )
            out.append(hits)
        return out
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SearchRLError(f"retrieval server {url} sent an unexpected response: {e}") from None


class HttpRetriever:
    """A remote retriever over one or several servers. Thread-safe for ``search``; ``asearch``
    for asyncio code.

    ``retries``: extra rounds over all servers after the first; ``wait``: keep retrying for at
    least this many seconds (a server restarting); ``max_batch``: the most queries sent in one
    request (keep it at or under the server's ``max_queries``).
    """

    kind = "http"

    def __init__(
        self,
        url: str | list[str],
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_batch: int = 256,
        *,
        wait: float | None = None,
        max_delay: float = 5.0,
        api_key: str | None = None,
    ):
        if max_batch < 1:
            raise SearchRLError(f"max_batch must be >= 1, got {max_batch}")
        self.urls = _urls(url)
        self.url = ",".join(self.urls)
        self.timeout, self.retries, self.backoff = timeout, max(0, retries), backoff
        self.wait = _env_float(WAIT_ENV, 0.0) if wait is None else float(wait)
        self.max_delay = max_delay
        self.max_batch = max_batch
        key = api_key or os.environ.get(API_KEY_ENV) or None
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._rr = itertools.count()
        self._rr_lock = threading.Lock()
        self._clients = {u: httpx.Client(base_url=u, timeout=timeout, headers=self._headers) for u in self.urls}
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self._aclient_objs: dict[str, httpx.AsyncClient] = {}

    def __repr__(self) -> str:
        return f"HttpRetriever({self.url!r})"

    # ---- sync -------------------------------------------------------------------------------

    def search(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        """Top-``k`` passages per query, best first, scores set (chunks of ``max_batch``)."""
        out: list[list[Passage]] = []
        for chunk in self._chunks(queries):
            data = self._request("POST", "/retrieve", _body(chunk, k))
            out.extend(_parse_result(data, len(chunk), self.url))
        return out

    def health(self) -> dict:
        """The first answering server's ``/health`` (``status``, ``passages``, ``kind``...)."""
        return self._request("GET", "/health")

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        last, t0 = "", time.monotonic()
        for rnd in itertools.count():
            if rnd:
                if not self._again(rnd, t0):
                    break
                self._note_outage(rnd, last)
                time.sleep(self._delay(rnd))
            for url in self._order():
                try:
                    resp = self._clients[url].request(method, path, json=body)
                except _RETRYABLE as e:
                    last = f"{url}: {type(e).__name__}: {e}"
                    continue
                outcome = self._check(resp, method, url, path)
                if outcome is None:
                    last = f"{url}: HTTP {resp.status_code}: {_server_message(resp)}"
                    continue
                return outcome
        raise self._unavailable(path, last, rnd, t0)

    # ---- async ------------------------------------------------------------------------------

    async def asearch(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        """Async :meth:`search`; chunks are sent concurrently."""
        chunks = self._chunks(queries)
        datas = await asyncio.gather(
            *(self._arequest("POST", "/retrieve", _body(c, k)) for c in chunks)
        )
        out: list[list[Passage]] = []
        for chunk, data in zip(chunks, datas):
            out.extend(_parse_result(data, len(chunk), self.url))
        return out

    async def ahealth(self) -> dict:
        return await self._arequest("GET", "/health")

    async def _arequest(self, method: str, path: str, body: dict | None = None) -> Any:
        clients = self._aclients()
        last, t0 = "", time.monotonic()
        for rnd in itertools.count():
            if rnd:
                if not self._again(rnd, t0):
                    break
                self._note_outage(rnd, last)
                await asyncio.sleep(self._delay(rnd))
            for url in self._order():
                try:
                    resp = await clients[url].request(method, path, json=body)
                except _RETRYABLE as e:
                    last = f"{url}: {type(e).__name__}: {e}"
                    continue
                outcome = self._check(resp, method, url, path)
                if outcome is None:
                    last = f"{url}: HTTP {resp.status_code}: {_server_message(resp)}"
                    continue
                return outcome
        raise self._unavailable(path, last, rnd, t0)

    def _aclients(self) -> dict[str, httpx.AsyncClient]:
        """One async client per server per event loop (an AsyncClient cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._aclient_loop is not loop or not self._aclient_objs:
            self._aclient_loop = loop  # the old loop's clients are dropped with it
            self._aclient_objs = {u: httpx.AsyncClient(base_url=u, timeout=self.timeout, headers=self._headers)
                                  for u in self.urls}
        return self._aclient_objs

    # ---- shared -----------------------------------------------------------------------------

    def _chunks(self, queries: list[str]) -> list[list[str]]:
        if isinstance(queries, str):
            raise SearchRLError("queries must be a list of strings, got one string")
        queries = list(queries)
        return [queries[i : i + self.max_batch] for i in range(0, len(queries), self.max_batch)]

    def _order(self) -> list[str]:
        """All servers, starting at the next one in round-robin order."""
        with self._rr_lock:
            start = next(self._rr) % len(self.urls)
        return self.urls[start:] + self.urls[:start]

    def _note_outage(self, rnd: int, last: str) -> None:
        if rnd == 1:
            logger.warning("no retrieval server answered (last: %s); retrying (%d more round(s), wait %.0fs)",
                           last, self.retries, self.wait)

    def _again(self, rnd: int, t0: float) -> bool:
        """Whether to try another round: retries left, or still within ``wait`` seconds."""
        return rnd <= self.retries or time.monotonic() - t0 < self.wait

    def _delay(self, rnd: int) -> float:
        return min(self.max_delay, self.backoff * 2 ** (rnd - 1))

    def _check(self, resp: httpx.Response, method: str, url: str, path: str) -> Any:
        """JSON of a 2xx answer; None for a retryable 5xx; raises on 4xx."""
        if resp.status_code >= 500:
            logger.warning("%s %s%s -> HTTP %d, trying again", method, url, path, resp.status_code)
            return None
        if resp.status_code >= 400:
            hint = " (set --api-key / $SEARCHRL_API_KEY to the server's key)" if resp.status_code == 401 else ""
            raise SearchRLError(
                f"retrieval server {url} rejected {method} {path} "
                f"(HTTP {resp.status_code}): {_server_message(resp)}{hint}"
            )
        try:
            return resp.json()
        except ValueError:
            raise SearchRLError(
                f"retrieval server {url} answered {path} with non-JSON: {resp.text[:200]!r}"
            ) from None

    def _unavailable(self, path: str, last: str, rounds: int, t0: float) -> RetrieverUnavailable:
        return RetrieverUnavailable(
            f"retrieval server(s) {self.url}{path} unavailable after {rounds * len(self.urls)} "
            f"attempt(s) over {time.monotonic() - t0:.1f}s (last: {last}); "
            "is `searchrl serve` running there?"
        )

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._aclient_objs, self._aclient_loop = {}, None

    async def aclose(self) -> None:
        for c in self._aclient_objs.values():
            await c.aclose()
        self._aclient_objs, self._aclient_loop = {}, None

    def __enter__(self) -> "HttpRetriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
