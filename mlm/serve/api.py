"""The HTTP API of `mlm serve`: routes, the bearer token, request bodies and their
limits, JSON errors. Pure functions on bytes and headers (no Ray), so every refusal is
checked without a server; the replica (`mlm.serve.app`) calls them.

Every endpoint but /healthz and /readyz needs `Authorization: Bearer TOKEN` when a token
is set; the replicas hold only its SHA-256, never the token. Errors are
`{"error": {"status": N, "message": "..."}}` with that status: 400 a malformed body,
401 no or a wrong token, 404 an unknown path or a task the model does not answer, 405 a
wrong method, 413 over a limit (body bytes, texts per request, tokens per text), 422 a
text the task cannot answer (fill-mask without a [MASK]), 500 a bug (the replica lives on).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from mlm.serve.model import RequestError

ROUTES = {"/v1/fill-mask": "fill-mask", "/v1/embed": "embed", "/v1/classify": "classify"}
HEALTH = ("/healthz", "/readyz")  # answered without the token: what probes and load balancers call
MAX_TOP_K = 100
DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_texts: int
    max_text_tokens: int


@dataclass(frozen=True)
class Work:
    """A parsed request: the task, its texts and (fill-mask) how many candidates per mask."""

    task: str
    texts: list[str]
    top_k: int = DEFAULT_TOP_K


def token_digest(token: str | None) -> str | None:
    """What the replicas keep of the token: its SHA-256 (hex); None: no token."""
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def check_token(authorization: str | None, digest: str | None) -> None:
    """401 unless `Authorization: Bearer TOKEN` matches (compared in constant time)."""
    if digest is None:
        return
    scheme, _, given = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip() or \
            not hmac.compare_digest(token_digest(given.strip()), digest):
        raise RequestError(401, "missing or wrong token: send `Authorization: Bearer TOKEN`")


def declared_length(content_length: str | None, limit: int) -> None:
    """Refuse a body by its Content-Length before reading it."""
    if content_length is None:
        return
    if not content_length.strip().isdigit():
        raise RequestError(400, f"bad Content-Length {content_length[:40]!r}")
    if int(content_length) > limit:
        raise RequestError(413, f"the body is {int(content_length)} bytes; at most {limit} (serve.max_body_bytes)")


async def read_body(request, limit: int) -> bytes:
    """The body of a Starlette request, refused (413) as soon as it passes `limit` bytes,
    whatever Content-Length claimed (or if it was chunked)."""
    declared_length(request.headers.get("content-length"), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the body is over {limit} bytes (serve.max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse(task: str, body: bytes, limits: Limits) -> Work:
    """A request body -> Work: `{"texts": [str, ...]}` or `{"text": str}`, and for
    fill-mask an optional `"top_k"` (1-100, default 5). Anything else is a 4xx."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise RequestError(400, "the body must be a JSON object: {\"texts\": [\"...\"]}")
    allowed = {"text", "texts", "top_k"} if task == "fill-mask" else {"text", "texts"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(sorted(allowed))}")
    if ("text" in doc) == ("texts" in doc):
        raise RequestError(400, "give `texts` (a list of strings) or `text` (one string)")
    texts = [doc["text"]] if "text" in doc else doc["texts"]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise RequestError(400, "`texts` must be a non-empty list of strings (`text`: a string)")
    if len(texts) > limits.max_texts:
        raise RequestError(413, f"{len(texts)} texts; at most {limits.max_texts} per request (serve.max_texts)")
    top_k = doc.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise RequestError(400, f"`top_k` must be an integer from 1 to {MAX_TOP_K}")
    return Work(task, texts, top_k)


def error_body(err: RequestError) -> dict:
    return {"error": {"status": err.status, "message": err.message}}
