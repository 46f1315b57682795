"""The upstream of the proxy tests: a plain FastAPI app that knows nothing of resumption.

Run it with `uvicorn app:app --port 8000` from this folder (`pip install -r requirements.txt`).

Routes:
- GET /v1/chat/stream?session_id=ID&n=N&interval_ms=MS&word=W: N events `W 0` .. `W N-1`
  (W is `token` by default), MS milliseconds apart, through sse-starlette. The session id may
  also come from the X-Session-Id header. Calls are counted per session id.
- GET /v2/chat/stream: the same as /v1/chat/stream.
- POST /v1/chat/stream?session_id=ID&n=N&interval_ms=MS: N events `post 0` .. `post N-1`;
  calls are counted under `POST ID`.
- GET /v1/chat/{session_id}/stream?n=N&interval_ms=MS: the same, the session id in the path.
- GET /calls?session_id=ID: {"calls": how many times a stream route was called for ID}.
- GET /json: a small JSON document.
- GET /download?size=N: N deterministic bytes, streamed in chunks.
- POST /upload: {"size": N, "sha256": HEX} of the request body, read as it arrives.
- GET /headers: the request headers as a JSON list of [name, value] pairs.
- GET /slow?seconds=S&session_id=ID&n=N: waits S seconds (default 5) before its response head,
  then streams N tokens (default 3) like /v1/chat/stream; calls are counted per session id.
- GET /requests: every request the app received so far, as [method, raw path] pairs, in order
  (this one included).
"""

import asyncio
import hashlib
from collections import Counter
from typing import Optional

from fastapi import FastAPI, Header, Request
from fastapi.responses import StreamingResponse
from sse_starlette.sse import EventSourceResponse

app = FastAPI()
calls: Counter = Counter()
seen: list = []


class Record:
    """Records the method and raw path (as it arrived, before any routing) of every request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            seen.append([scope["method"], scope.get("raw_path", b"").decode("latin-1")])
        await self.app(scope, receive, send)


app.add_middleware(Record)

PATTERN = bytes(range(251))  # a prime length, so chunks never line up with it
CHUNK = 64 * 1024


def tokens(n: int, interval_ms: int, word: str = "token"):
    async def events():
        for i in range(n):
            if interval_ms > 0 and i > 0:
                await asyncio.sleep(interval_ms / 1000)
            yield {"data": f"{word} {i}"}

    return EventSourceResponse(events())


@app.get("/v1/chat/stream")
@app.get("/v2/chat/stream")
async def chat_stream(
    session_id: str = "",
    n: int = 10,
    interval_ms: int = 0,
    word: str = "token",
    x_session_id: Optional[str] = Header(default=None),
):
    calls[session_id or x_session_id or ""] += 1
    return tokens(n, interval_ms, word)


@app.post("/v1/chat/stream")
async def chat_stream_post(session_id: str = "", n: int = 10, interval_ms: int = 0):
    calls[f"POST {session_id}"] += 1
    return tokens(n, interval_ms, "post")


@app.get("/v1/chat/{session_id}/stream")
async def chat_stream_by_path(session_id: str, n: int = 10, interval_ms: int = 0):
    calls[session_id] += 1
    return tokens(n, interval_ms)


@app.get("/calls")
async def get_calls(session_id: str = ""):
    return {"calls": calls[session_id]}


@app.get("/requests")
async def requests():
    return seen


@app.get("/json")
async def json_document():
    return {"plain": "json", "numbers": [1, 2, 3], "text": "caf\u00e9 \u2615"}


@app.get("/download")
async def download(size: int = 0):
    async def chunks():
        sent = 0
        while sent < size:
            start = sent % len(PATTERN)
            n = min(CHUNK, size - sent)
            reps = (start + n) // len(PATTERN) + 1
            yield (PATTERN * reps)[start : start + n]
            sent += n

    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"content-length": str(size)},
    )


@app.post("/upload")
async def upload(request: Request):
    size, digest = 0, hashlib.sha256()
    async for chunk in request.stream():
        size += len(chunk)
        digest.update(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


@app.get("/headers")
async def headers(request: Request):
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw]


@app.get("/slow")
async def slow(seconds: float = 5, session_id: str = "", n: int = 3):
    calls[session_id] += 1
    await asyncio.sleep(seconds)
    return tokens(n, 0)
