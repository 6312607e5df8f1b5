"""Schemathesis fuzzes a real `searchrl serve` process on 127.0.0.1 from its own OpenAPI schema.

Every operation in ``/openapi.json`` gets schema-valid cases (must answer 200) and, for operations
with a body, schema-violating cases (must answer 4xx); nothing may answer 5xx, and the process
must be alive and healthy afterwards. Bounded: ``EXAMPLES`` cases per operation and mode.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).parents[1] / "benchmarks" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

EXAMPLES = 150


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    index = soak.make_index(tmp_path_factory.mktemp("schema-fuzz"), passages=200)
    srv = soak.Server(index, "--max-queries", "16", "--max-topk", "20").wait()
    yield srv
    srv.stop()


def test_schema_driven_fuzz_no_5xx_and_server_alive(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in ops} >= {"GET /health", "POST /retrieve"}
    seen: dict[tuple[str, str, int], int] = {}
    for op in ops:
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if op.body else [])
        for mode in modes:
            _fuzz(op, mode, server.url, seen)
    total = sum(seen.values())
    assert not [k for k in seen if k[2] >= 500], seen
    assert sum(n for k, n in seen.items() if k[:2] == ("POST /retrieve", "NEGATIVE")) >= EXAMPLES // 2, seen
    assert total >= EXAMPLES
    assert server.proc.poll() is None, "the server died"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def _fuzz(op, mode: GenerationMode, url: str, seen: dict) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        resp = case.call(base_url=url, timeout=30)
        key = (op.label, mode.name, resp.status_code)
        seen[key] = seen.get(key, 0) + 1
        assert resp.status_code < 500, (case.body, resp.text[:300])
        if mode is GenerationMode.POSITIVE:
            assert resp.status_code == 200, (case.body, resp.text[:300])
        else:
            assert 400 <= resp.status_code < 500, (case.body, resp.text[:300])

    run()
