"""The bare baseline: Litestar under uvicorn doing only what the framework must do for Parley's routes.

`POST /v1/sms-conversations` decodes the body strictly into the very struct Parley uses and answers a
constant 201; the other routes answer constants the size of Parley's. Same paths as Parley, so one wrk
script drives both servers.
"""

from __future__ import annotations

import msgspec
from litestar import Litestar, Request, Response, get, post

from app.api.simulator import SimulatedInbound
from app.domain.conversations import CloseConversation, CreateConversation

_create = msgspec.json.Decoder(CreateConversation, strict=True)
_close = msgspec.json.Decoder(CloseConversation, strict=True)
_inbound = msgspec.json.Decoder(SimulatedInbound, strict=True)

CREATED = (
    b'{"data":{"conversationId":"0b6c1f7e-2f51-4bb5-9d8e-7c1f2b0a9d11",'
    b'"providerMessageId":"SM0123456789abcdef0123456789abcdef","status":"in_progress"},'
    b'"meta":{"request_id":"req_0123456789abcdef0123"}}'
)
CONVERSATION = (
    b'{"data":{"conversationId":"0b6c1f7e-2f51-4bb5-9d8e-7c1f2b0a9d11","status":"in_progress",'
    b'"agentId":"5d1f0c2e-6a43-4b7f-8d1e-2f3a4b5c6d7e","agentSlug":"recall-sms","fromNumber":"+15555550123",'
    b'"toNumber":"+15555550199","dynamicVariables":{"customerName":"Ada","dealershipName":"PAM Motors",'
    b'"recallId":"24V-123"},"metadata":{},"createdAt":"2026-04-10T14:00:00.000Z",'
    b'"lastActivityAt":"2026-04-10T14:00:00.000Z","endedAt":null,"endReason":null,"supersededBy":null,'
    b'"assistantPaused":false,"messageCount":1},"meta":{"request_id":"req_0123456789abcdef0123"}}'
)
CLOSED = (
    b'{"data":{"conversationId":"0b6c1f7e-2f51-4bb5-9d8e-7c1f2b0a9d11","status":"closed",'
    b'"endedAt":"2026-04-10T14:00:00.000Z","endReason":"admin_closed","alreadyClosed":false},'
    b'"meta":{"request_id":"req_0123456789abcdef0123"}}'
)
INBOUND = (
    b'{"data":{"messageId":"0b6c1f7e-2f51-4bb5-9d8e-7c1f2b0a9d12",'
    b'"conversationId":"0b6c1f7e-2f51-4bb5-9d8e-7c1f2b0a9d11"},"meta":{"request_id":"req_0123456789abcdef0123"}}'
)


def _json(body: bytes, status: int) -> Response[bytes]:
    return Response(content=body, status_code=status, media_type="application/json")


@post("/v1/sms-conversations", status_code=201)
async def create(request: Request) -> Response[bytes]:
    _create.decode(await request.body())
    return _json(CREATED, 201)


@get("/v1/sms-conversations/{conversation_id:str}")
async def read(conversation_id: str) -> Response[bytes]:
    return _json(CONVERSATION, 200)


@post("/v1/sms-conversations/{conversation_id:str}/close", status_code=200)
async def close(request: Request, conversation_id: str) -> Response[bytes]:
    raw = await request.body()
    _close.decode(raw if raw.strip() else b"{}")
    return _json(CLOSED, 200)


@post("/v1/simulator/inbound", status_code=201)
async def inbound(request: Request) -> Response[bytes]:
    _inbound.decode(await request.body())
    return _json(INBOUND, 201)


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


app = Litestar(route_handlers=[create, read, close, inbound, healthz], openapi_config=None, debug=False)
