"""``HttpRetriever``: the :class:`Retriever` interface over a Search-R1 ``/retrieve`` server.

Speaks the contract served by :mod:`searchrl.retrieval.server` (and by the original Search-R1
server): it always asks for scores and turns each item back into a :class:`Passage`. Long query
lists are split into chunks of ``max_batch``. Connection errors, timeouts and 5xx answers are
retried with exponential backoff (``backoff * 2**(attempt - 1)`` seconds before retry ``attempt``);
a 4xx answer is the caller's fault and raises :class:`SearchRLError` with the server's message at
once. A server still failing after the retries raises :class:`RetrieverUnavailable` naming the URL.

Left out: authentication, request signing, and load balancing over several servers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx

from searchrl.errors import RetrieverUnavailable, SearchRLError
from searchrl.types import Passage

logger = logging.getLogger(__name__)

_RETRYABLE = (httpx.TransportError,)  # connect/read/write errors, timeouts, protocol errors


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
    """A remote retriever. Thread-safe for ``search``; ``asearch`` for asyncio code.

    ``retries`` is the number of retries after the first attempt. ``max_batch`` is the most
    queries sent in one request (keep it at or under the server's ``max_queries``).
    """

    kind = "http"

    def __init__(
        self,
        url: str,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_batch: int = 256,
    ):
        if max_batch < 1:
            raise SearchRLError(f"max_batch must be >= 1, got {max_batch}")
        self.url = _base_url(url)
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_batch = max_batch
        self._client = httpx.Client(base_url=self.url, timeout=timeout)
        self._aclient_loop: asyncio.AbstractEventLoop | None = None
        self._aclient_obj: httpx.AsyncClient | None = None

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
        """The server's ``/health`` answer (``status``, ``passages``, ``kind``...)."""
        return self._request("GET", "/health")

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self._delay(attempt))
            try:
                resp = self._client.request(method, path, json=body)
            except _RETRYABLE as e:
                last = f"{type(e).__name__}: {e}"
                continue
            outcome = self._check(resp, method, path)
            if outcome is None:
                last = f"HTTP {resp.status_code}: {_server_message(resp)}"
                continue
            return outcome
        raise self._unavailable(path, last)

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
        client = self._aclient()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self._delay(attempt))
            try:
                resp = await client.request(method, path, json=body)
            except _RETRYABLE as e:
                last = f"{type(e).__name__}: {e}"
                continue
            outcome = self._check(resp, method, path)
            if outcome is None:
                last = f"HTTP {resp.status_code}: {_server_message(resp)}"
                continue
            return outcome
        raise self._unavailable(path, last)

    def _aclient(self) -> httpx.AsyncClient:
        """One async client per event loop (an AsyncClient cannot move between loops)."""
        loop = asyncio.get_running_loop()
        if self._aclient_loop is not loop or self._aclient_obj is None:
            self._aclient_loop = loop  # the old loop's client is dropped with it
            self._aclient_obj = httpx.AsyncClient(base_url=self.url, timeout=self.timeout)
        return self._aclient_obj

    # ---- shared -----------------------------------------------------------------------------

    def _chunks(self, queries: list[str]) -> list[list[str]]:
        if isinstance(queries, str):
            raise SearchRLError("queries must be a list of strings, got one string")
        queries = list(queries)
        return [queries[i : i + self.max_batch] for i in range(0, len(queries), self.max_batch)]

    def _delay(self, attempt: int) -> float:
        return self.backoff * 2 ** (attempt - 1)

    def _check(self, resp: httpx.Response, method: str, path: str) -> Any:
        """JSON of a 2xx answer; None for a retryable 5xx; raises on 4xx."""
        if resp.status_code >= 500:
            logger.warning("%s %s%s -> HTTP %d, retrying", method, self.url, path, resp.status_code)
            return None
        if resp.status_code >= 400:
            raise SearchRLError(
                f"retrieval server {self.url} rejected {method} {path} "
                f"(HTTP {resp.status_code}): {_server_message(resp)}"
            )
        try:
            return resp.json()
        except ValueError:
            raise SearchRLError(
                f"retrieval server {self.url} answered {path} with non-JSON: {resp.text[:200]!r}"
            ) from None

    def _unavailable(self, path: str, last: str) -> RetrieverUnavailable:
        return RetrieverUnavailable(
            f"retrieval server {self.url}{path} unavailable after {self.retries + 1} attempt(s) "
            f"({last}); is `searchrl serve` running there?"
        )

    def close(self) -> None:
        self._client.close()
        self._aclient_obj = self._aclient_loop = None

    async def aclose(self) -> None:
        if self._aclient_obj is not None:
            await self._aclient_obj.aclose()
        self._aclient_obj = self._aclient_loop = None

    def __enter__(self) -> "HttpRetriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
