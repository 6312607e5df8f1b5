"""The retrieval HTTP server and its client, over real HTTP on 127.0.0.1.

Servers run in background threads on free ports (module fixtures). Retrievers: a deterministic
in-test one (word-overlap scores, call counting, optional delay, a query that raises), a BM25 built
with bm25s directly over a tiny corpus, and searchrl's own BM25Retriever.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from searchrl.errors import RetrieverUnavailable, SearchRLError
from searchrl.retrieval.base import Retriever
from searchrl.retrieval.client import HttpRetriever
from searchrl.retrieval.server import BackgroundServer, create_app, serve
from searchrl.types import Passage

CORPUS = [
    ("p0", "Paris", "Paris is the capital and largest city of France."),
    ("p1", "Berlin", "Berlin is the capital of Germany and its largest city."),
    ("p2", "Rome", "Rome is the capital city of Italy, founded on seven hills."),
    ("p3", "Cat", "The cat is a small domesticated carnivorous mammal."),
    ("p4", "Dog", "The dog is a domesticated descendant of the wolf."),
    ("p5", "Wolf", "The wolf is a large canine native to Eurasia and North America."),
    ("p6", "Seine", "The Seine is a river that flows through Paris in France."),
    ("p7", "Rhine", "The Rhine flows through Germany and the Netherlands."),
    ("p8", "Tiber", "The Tiber is the river of Rome in Italy."),
    ("p9", "Eiffel Tower", "The Eiffel Tower is a wrought-iron tower in Paris, France."),
    ("p10", "Colosseum", "The Colosseum is an ancient amphitheatre in the centre of Rome."),
    ("p11", "Brandenburg Gate", "The Brandenburg Gate is a monument in Berlin, Germany."),
]
PASSAGES = [Passage(i, t, x) for i, t, x in CORPUS]
QUERIES = [
    "capital of France", "river in Germany", "domesticated wolf", "ancient Rome", "Paris tower"
]


class FakeRetriever:
    """Deterministic: score = shared lower-case words (+ tiny id tie-break). Counts calls."""

    kind = "fake"

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: list[tuple[int, int]] = []  # (number of queries, k) per call
        self._lock = threading.Lock()

    @property
    def num_passages(self) -> int:
        return len(PASSAGES)

    def search(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        with self._lock:
            self.calls.append((len(queries), k))
        if self.delay:
            time.sleep(self.delay)
        if any("boom" in q for q in queries):
            raise RuntimeError("kaboom: the index exploded")
        out = []
        for q in queries:
            words = set(q.lower().split())
            scored = []
            for j, p in enumerate(PASSAGES):
                shared = words & set(p.contents.lower().replace(",", " ").split())
                scored.append((len(shared) + 0.01 * (20 - j), p))
            scored.sort(key=lambda t: -t[0])
            out.append([p.with_score(s) for s, p in scored[:k]])
        return out


class Bm25sRetriever:
    """A Retriever over bm25s used directly (independent of searchrl's own bm25 module)."""

    def __init__(self, passages: list[Passage]):
        import bm25s
        import Stemmer

        self.passages, self.stemmer = passages, Stemmer.Stemmer("english")
        texts = [p.contents for p in passages]
        tokens = bm25s.tokenize(texts, stemmer=self.stemmer, show_progress=False)
        self.model = bm25s.BM25()
        self.model.index(tokens, show_progress=False)

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, queries: list[str], k: int = 3) -> list[list[Passage]]:
        import bm25s

        toks = bm25s.tokenize(queries, stemmer=self.stemmer, show_progress=False, return_ids=False)
        docs, scores = self.model.retrieve(toks, k=k, show_progress=False)
        return [
            [self.passages[int(d)].with_score(float(s)) for d, s in zip(drow, srow)]
            for drow, srow in zip(docs, scores)
        ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake_server():
    retriever = FakeRetriever()
    app = create_app(retriever, max_topk=10, max_queries=8, max_body_bytes=4096)
    with BackgroundServer(app) as srv:
        yield srv.url, retriever, app


@pytest.fixture(scope="module")
def bm25_server():
    retriever = Bm25sRetriever(PASSAGES)
    with BackgroundServer(create_app(retriever)) as srv:
        yield srv.url, retriever


def post(url: str, body=None, content: bytes | None = None) -> httpx.Response:
    if content is None:
        content = json.dumps(body).encode()
    return httpx.post(url + "/retrieve", content=content, timeout=10)


def assert_healthy(url: str) -> None:
    r = httpx.get(url + "/health", timeout=5)
    assert r.status_code == 200 and r.json()["status"] == "ok"


# ---------------------------------------------------------------- the contract


def test_retrieve_with_scores(fake_server):
    url, retriever, _ = fake_server
    r = post(url, {"queries": QUERIES[:2], "topk": 4, "return_scores": True})
    assert r.status_code == 200
    result = r.json()["result"]
    assert len(result) == 2
    expected = retriever.search(QUERIES[:2], 4)
    for row, exp in zip(result, expected):
        assert len(row) == 4
        assert all(set(item) == {"document", "score"} for item in row)
        assert all(set(item["document"]) == {"id", "contents"} for item in row)
        scores = [item["score"] for item in row]
        assert scores == sorted(scores, reverse=True)
        assert [item["document"]["id"] for item in row] == [p.id for p in exp]
        assert [item["document"]["contents"] for item in row] == [p.contents for p in exp]
        assert scores == pytest.approx([p.score for p in exp])


def test_retrieve_without_scores_gives_bare_documents(fake_server):
    url, retriever, _ = fake_server
    r = post(url, {"queries": ["capital of France"], "topk": 2, "return_scores": False})
    assert r.status_code == 200
    row = r.json()["result"][0]
    expected = retriever.search(["capital of France"], 2)[0]
    assert row == [{"id": p.id, "contents": p.contents} for p in expected]


def test_defaults_topk_3_without_scores(fake_server):
    url, _, _ = fake_server
    row = post(url, {"queries": ["capital of France"]}).json()["result"][0]
    assert len(row) == 3 and all(set(item) == {"id", "contents"} for item in row)


def test_empty_query_list_is_ok(fake_server):
    url, _, _ = fake_server
    r = post(url, {"queries": [], "topk": 3})
    assert r.status_code == 200 and r.json() == {"result": []}


def test_health_reports_retriever(fake_server, bm25_server):
    h = httpx.get(fake_server[0] + "/health").json()
    assert h["status"] == "ok" and h["passages"] == len(PASSAGES) and h["kind"] == "fake"
    h = httpx.get(bm25_server[0] + "/health").json()
    assert h["passages"] == len(PASSAGES) and h["kind"] == "Bm25sRetriever"


def test_sequential_requests_are_not_delayed(fake_server):
    """Regression: without TCP_NODELAY each answer waited ~40 ms (Nagle + delayed ACK)."""
    url, _, _ = fake_server
    with httpx.Client(base_url=url, timeout=5) as c:
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            assert c.post("/retrieve", json={"queries": ["Rome"]}).status_code == 200
            times.append(time.perf_counter() - t0)
    assert sorted(times)[len(times) // 2] < 0.030


def test_unknown_route_uses_error_shape(fake_server):
    r = httpx.get(fake_server[0] + "/nope")
    assert r.status_code == 404 and "message" in r.json()["error"]


@pytest.mark.parametrize("k", [1, 3, 12])
def test_http_matches_in_process_bm25(bm25_server, k):
    url, retriever = bm25_server
    with HttpRetriever(url, timeout=5) as client:
        assert isinstance(client, Retriever)
        got = client.search(QUERIES, k)
    expected = retriever.search(QUERIES, k)
    assert len(got) == len(QUERIES)
    for g, e in zip(got, expected):
        assert [(p.id, p.title, p.text) for p in g] == [(p.id, p.title, p.text) for p in e]
        assert [p.score for p in g] == pytest.approx([p.score for p in e], rel=1e-6)


def test_async_client_matches_sync(bm25_server):
    url, _ = bm25_server
    client = HttpRetriever(url, timeout=5, max_batch=2)

    async def both():
        try:
            return await client.asearch(QUERIES, 3), await client.ahealth()
        finally:
            await client.aclose()

    got, health = asyncio.run(both())
    assert got == client.search(QUERIES, 3)
    assert health["status"] == "ok"


def test_client_splits_big_lists(fake_server):
    url, retriever, _ = fake_server  # this server accepts at most 8 queries per request
    queries = [f"capital city {i}" for i in range(19)]
    before = len(retriever.calls)
    with HttpRetriever(url, timeout=5, max_batch=8) as client:
        got = client.search(queries, 2)
    sizes = sorted(n for n, _ in retriever.calls[before:])
    assert got == retriever.search(queries, 2)
    assert sizes == [3, 8, 8]


# ---------------------------------------------------------------- bad input

BAD = [
    (b"{not json", 400, "not valid JSON", None),
    (b"\xff\xfe", 400, "not valid JSON", None),
    (b"[1, 2]", 422, "must be a JSON object, got list", None),
    (b'"queries"', 422, "must be a JSON object, got str", None),
    (b"{}", 422, "missing required field 'queries'", "queries"),
    (b'{"queries": "paris"}', 422, "'queries' must be a list of strings, got str", "queries"),
    (b'{"queries": ["ok", 3]}', 422, "queries[1] must be a string, got int", "queries"),
    (b'{"queries": ["ok", null]}', 422, "queries[1] must be a string, got null", "queries"),
    (b'{"queries": ["ok", "ok", "  \\n"]}', 422, "queries[2] is empty or whitespace", "queries"),
    (b'{"queries": [""]}', 422, "queries[0] is empty", "queries"),
    (b'{"queries": ["a"], "topk": "3"}', 422, "'topk' must be an integer, got str", "topk"),
    (b'{"queries": ["a"], "topk": 2.5}', 422, "'topk' must be an integer, got float", "topk"),  # 2.0 is 2
    (b'{"queries": ["a"], "topk": true}', 422, "'topk' must be an integer, got bool", "topk"),
    (b'{"queries": ["a"], "topk": 0}', 422, "between 1 and 10, got 0", "topk"),
    (b'{"queries": ["a"], "topk": 11}', 422, "between 1 and 10, got 11", "topk"),
    (b'{"queries": ["a"], "return_scores": "yes"}', 422, "must be true or false", "return_scores"),
    (b'{"queries": ["a"], "return_scores": 1}', 422, "got int", "return_scores"),
    (b'{"queries": ["a","b","c","d","e","f","g","h","i"]}', 422, "9 > max_queries=8", "queries"),
    (b'{"queries": ["a"], "top_k": 3, "extra": 1}', 422, "unknown field(s): extra, top_k", "extra"),
]


@pytest.mark.parametrize("body,status,message,field", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input_is_a_clear_4xx(fake_server, body, status, message, field):
    url, _, _ = fake_server
    r = post(url, content=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"]
    assert err["field"] == field
    assert_healthy(url)


# ECMAScript's WhiteSpace and LineTerminator (what JSON Schema's \\s means), from the spec.
ECMA_BLANK = set("\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff") | {
    chr(c) for c in range(0x2000, 0x200B)}


@pytest.mark.parametrize("ch", sorted({chr(c) for c in range(0x3000 + 1) if chr(c).isspace()} | ECMA_BLANK | {"\x1f"}),
                         ids=lambda c: f"U+{ord(c):04X}")
def test_blank_queries_are_refused_exactly_as_the_published_schema_says(fake_server, ch):
    """The schema's pattern counts ECMAScript's whitespace as blank; Python's str.isspace differs
    (the separators U+001C-U+001F and U+0085 are blank to it, U+FEFF is not). Schemathesis found
    `["\\x1f"]`, valid by the schema, refused by the server: the two now share one rule."""
    url, _, _ = fake_server
    r = post(url, {"queries": [ch * 2]})
    assert r.status_code == (422 if ch in ECMA_BLANK else 200), r.text


def test_body_too_large_is_413(fake_server):
    url, _, _ = fake_server
    r = post(url, {"queries": ["x" * 5000]})
    assert r.status_code == 413 and "more than 4096" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(url + "/retrieve", content=chunks(), timeout=10)
    assert r.status_code == 413
    assert_healthy(url)


def test_client_raises_server_message_on_4xx_without_retry(fake_server):
    url, retriever, _ = fake_server
    before = len(retriever.calls)
    with HttpRetriever(url, timeout=5, retries=3, backoff=5.0) as client:
        t0 = time.perf_counter()
        with pytest.raises(SearchRLError, match=r"HTTP 422.*queries\[0\] is empty"):
            client.search(["   "], 3)
        assert time.perf_counter() - t0 < 2.0  # no backoff sleeps: 4xx is not retried
    assert len(retriever.calls) == before


def test_retriever_exception_is_500_and_server_survives(fake_server):
    url, _, _ = fake_server
    r = post(url, {"queries": ["boom now"]})
    assert r.status_code == 500
    assert "kaboom: the index exploded" in r.json()["error"]["message"]
    assert_healthy(url)
    assert post(url, {"queries": ["capital of France"]}).status_code == 200


# ---------------------------------------------------------------- concurrency


def test_16_concurrent_clients_no_errors(bm25_server):
    url, retriever = bm25_server
    expected = {q: retriever.search([q], 3)[0] for q in QUERIES}
    errors: list[str] = []
    counts = [0] * 16

    def worker(i: int) -> None:
        with HttpRetriever(url, timeout=10, retries=0) as client:
            for j in range(15):
                q = QUERIES[(i + j) % len(QUERIES)]
                try:
                    got = client.search([q], 3)[0]
                    if [p.id for p in got] != [p.id for p in expected[q]]:
                        errors.append(f"client {i}: wrong result for {q!r}")
                    counts[i] += 1
                except Exception as e:  # noqa: BLE001
                    errors.append(f"client {i}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert counts == [15] * 16


def _fire(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            return await asyncio.gather(*(c.post("/retrieve", json=b) for b in bodies))

    return asyncio.run(go())


@pytest.mark.parametrize("coalesce,window_ms", [(True, 50.0), (True, 0.0), (False, 0.0)])
def test_coalescing_merges_concurrent_requests(coalesce, window_ms):
    retriever = FakeRetriever(delay=0.05)
    app = create_app(retriever, batch_window_ms=window_ms, max_batch_queries=64, coalesce=coalesce)
    bodies = [
        {"queries": [QUERIES[i % 5]] * (1 + i % 3), "topk": 1 + i % 4, "return_scores": True}
        for i in range(12)
    ]
    with BackgroundServer(app) as srv:
        responses = _fire(srv.url, bodies)
    served = list(retriever.calls)
    assert [r.status_code for r in responses] == [200] * 12
    for body, r in zip(bodies, responses):  # each gets its own slice, cut to its own topk
        want = retriever.search(body["queries"], body["topk"])
        got = r.json()["result"]
        assert [[it["document"]["id"] for it in row] for row in got] == [
            [p.id for p in row] for row in want
        ]
    assert sum(n for n, _ in served) == sum(len(b["queries"]) for b in bodies)
    if coalesce:  # 12 requests merged into a few calls (with no window: those queued meanwhile)
        assert len(served) <= (3 if window_ms else 5)
        assert max(k for _, k in served) == 4  # run at the batch's largest topk
        assert app.state.batcher.calls == len(served)
    else:
        assert len(served) == 12


def test_app_survives_a_restart():
    retriever = FakeRetriever()
    app = create_app(retriever)
    for _ in range(2):  # shutdown closes the worker thread; the next start must make a new one
        with BackgroundServer(app) as srv:
            assert post(srv.url, {"queries": ["Rome"], "topk": 1}).json()["result"][0][0]["id"]
    assert app.state.batcher.calls == 2


def test_merged_failure_only_fails_the_bad_request():
    retriever = FakeRetriever(delay=0.02)
    app = create_app(retriever, batch_window_ms=100.0)
    bodies = [{"queries": ["capital of France"]}, {"queries": ["boom"]}, {"queries": ["Rome"]}]
    with BackgroundServer(app) as srv:
        statuses = [r.status_code for r in _fire(srv.url, bodies)]
    assert statuses == [200, 500, 200]
    assert retriever.calls[0][0] == 3  # they were merged first, then retried alone


# ---------------------------------------------------------------- client retries


class FlakyApp:
    """A server that answers 503 ``failures`` times, then a valid result."""

    def __init__(self, failures: int, delay: float = 0.0):
        self.failures, self.delay, self.hits = failures, delay, 0
        self.app = FastAPI()

        @self.app.post("/retrieve")
        async def retrieve(body: dict):
            self.hits += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.hits <= self.failures:
                return JSONResponse({"error": {"message": "warming up", "field": None}}, 503)
            doc = {"id": "7", "contents": '"T"\nbody'}
            return {"result": [[{"document": doc, "score": 2.5}] for _ in body["queries"]]}


def test_client_retries_then_succeeds():
    flaky = FlakyApp(failures=2)
    with BackgroundServer(flaky.app) as srv:
        client = HttpRetriever(srv.url + "/retrieve", timeout=5, retries=3, backoff=0.01)
        assert client.search(["q1", "q2"], 1) == [[Passage("7", "T", "body", 2.5)]] * 2
    assert flaky.hits == 3


def test_client_gives_up_on_persistent_5xx():
    flaky = FlakyApp(failures=100)
    with BackgroundServer(flaky.app) as srv:
        client = HttpRetriever(srv.url, timeout=5, retries=2, backoff=0.01)
        with pytest.raises(RetrieverUnavailable, match=r"after 3 attempt.*HTTP 503: warming up"):
            client.search(["q"], 1)
    assert flaky.hits == 3


def test_client_retries_timeouts():
    flaky = FlakyApp(failures=0, delay=1.0)
    with BackgroundServer(flaky.app) as srv:
        client = HttpRetriever(srv.url, timeout=0.2, retries=1, backoff=0.01)
        with pytest.raises(RetrieverUnavailable, match="Timeout"):
            client.search(["q"], 1)
    assert flaky.hits == 2


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = HttpRetriever(url, timeout=0.5, retries=2, backoff=0.01)
    with pytest.raises(RetrieverUnavailable, match=f"{url}/retrieve unavailable after 3 attempt"):
        client.search(["q"], 3)
    with pytest.raises(RetrieverUnavailable, match=url):
        asyncio.run(client.asearch(["q"], 3))
    with pytest.raises(RetrieverUnavailable, match="/health"):
        client.health()


def test_serve_reports_a_busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(SearchRLError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(FakeRetriever(), port=port)


# ---------------------------------------------------------------- searchrl's own BM25


def test_searchrl_bm25_over_http():
    bm25 = pytest.importorskip("searchrl.retrieval.bm25")
    retriever = bm25.BM25Retriever.build(PASSAGES, show_progress=False)
    with BackgroundServer(create_app(retriever)) as srv:
        client = HttpRetriever(srv.url, timeout=5)
        assert client.health()["passages"] == len(PASSAGES) and client.health()["kind"] == "bm25"
        assert client.search(QUERIES, 3) == retriever.search(QUERIES, 3)
    reference = Bm25sRetriever(PASSAGES).search(QUERIES, 1)  # same top passage as bm25s directly
    assert [r[0].id for r in retriever.search(QUERIES, 1)] == [r[0].id for r in reference]
