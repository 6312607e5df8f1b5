"""Who may query the retrieval server: bind-address policy, bearer API key, published schema.

:func:`bind_policy` is the one decision: loopback binds need nothing, any other address needs an
API key unless the operator says ``insecure``. :func:`authorized` checks a request's
``Authorization: Bearer KEY`` header in constant time. :func:`retrieve_openapi` is the ``/retrieve``
request schema and error answers as published in the server's OpenAPI document (schema-driven
fuzzers read it). Left out: TLS, several keys, per-key quotas.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request
from fastapi.responses import JSONResponse

from searchrl.errors import ConfigError

API_KEY_ENV = "SEARCHRL_API_KEY"
DEFAULT_TOPK = 3
DEFAULT_RETURN_SCORES = False


def authorized(request: Request, api_key: str | None) -> bool:
    """True when no key is configured or the request carries it as a bearer token."""
    if not api_key:
        return True
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def unauthorized() -> JSONResponse:
    body = {"error": {"message": "missing or wrong API key: send 'Authorization: Bearer KEY'", "field": None}}
    return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})


_ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "object"}}, "required": ["error"]}


# Characters a query may not consist of only: JSON Schema's (ECMAScript's) whitespace, so that the
# published pattern and the server's check agree (Python's str.isspace differs: it counts the
# separators \x1c-\x1f and \x85 as blank, and not \ufeff).
BLANK = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NOT_BLANK = f"[^{BLANK}]"


def request_schema(max_topk: int, max_queries: int) -> dict:
    """The JSON schema of a ``/retrieve`` body (published in the server's OpenAPI document)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["queries"],
        "properties": {
            "queries": {"type": "array", "maxItems": max_queries,
                        "items": {"type": "string", "pattern": NOT_BLANK}},
            "topk": {"type": "integer", "minimum": 1, "maximum": max_topk, "default": DEFAULT_TOPK},
            "return_scores": {"type": "boolean", "default": DEFAULT_RETURN_SCORES},
        },
    }


def retrieve_openapi(max_topk: int, max_queries: int) -> dict:
    errors = ((400, "malformed JSON"), (401, "missing or wrong API key"), (413, "body too large"),
              (422, "invalid request"), (500, "retriever failed"))
    schema = request_schema(max_topk, max_queries)
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "responses": {
            str(code): {"description": why, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
            for code, why in errors
        },
    }


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal or ``localhost``) is a loopback address.

    >>> [is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost", "0.0.0.0", "10.0.0.1")]
    [True, True, True, True, False, False]
    """
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def bind_policy(host: str, api_key: str | None, insecure: bool = False) -> str:
    """Decide how a server on ``host`` may run: ``"api-key"``, ``"loopback"`` or ``"insecure"``.

    A non-loopback address without a key and without ``insecure`` raises :class:`ConfigError`.

    >>> bind_policy("127.0.0.1", None), bind_policy("0.0.0.0", "k"), bind_policy("0.0.0.0", None, True)
    ('loopback', 'api-key', 'insecure')
    """
    if api_key:
        return "api-key"
    if is_loopback(host):
        return "loopback"
    if insecure:
        return "insecure"
    raise ConfigError(
        f"binding {host} (not loopback) needs an API key: pass --api-key KEY or set {API_KEY_ENV}"
        " (clients then send it), or pass --insecure to serve anyone who can reach the port"
    )


