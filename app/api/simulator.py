"""The simulator's routes (SPEC §8): a phone that texts in, and what a phone received."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Request, get, post
from litestar.params import Parameter

from app.api import requests as rq
from app.api.schemas import ListMeta, Meta, errors, json_body
from app.clock import iso
from app.domain import inbound
from app.domain.errors import FieldProblem, ValidationFailed
from app.domain.phone import e164_problem
from app.domain.types import E164_PATTERN, E164Number, SmsBody, StrictDecoder
from app.store import conversations as store


class SimulatedInbound(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    from_: E164Number = msgspec.field(name="from")
    to: E164Number
    body: SmsBody


class InboundAccepted(msgspec.Struct, rename="camel", kw_only=True):
    message_id: str
    conversation_id: str | None


class InboundEnvelope(msgspec.Struct):
    data: InboundAccepted
    meta: Meta


class PhoneMessage(msgspec.Struct, rename="camel", kw_only=True):
    message_id: str
    from_: str = msgspec.field(name="from")
    to: str
    body: str
    created_at: str


class PhoneMessages(msgspec.Struct):
    data: list[PhoneMessage]
    meta: ListMeta


inbound_decoder = StrictDecoder(SimulatedInbound)


class SimulatorController(Controller):
    path = "/v1/simulator"
    tags = ["Simulator"]

    @post("/inbound", status_code=201, operation_class=json_body(SimulatedInbound), responses=errors(413, 415))
    async def inbound(self, request: Request) -> InboundEnvelope:
        ctx = rq.context(request)
        body = await rq.read_json(request, inbound_decoder)
        problems = [
            FieldProblem(name, problem)
            for name, value in (("from", body.from_), ("to", body.to))
            if (problem := e164_problem(value))
        ]
        if problems:
            raise ValidationFailed.of(problems)
        sms = inbound.InboundSms(from_number=body.from_, to_number=body.to, body=body.body, provider="simulator")
        result = await inbound.receive(ctx, sms, org_id=rq.org_of(request))
        data = InboundAccepted(
            message_id=result.message.id,
            conversation_id=result.conversation.id if result.conversation else None,
        )
        return InboundEnvelope(data=data, meta=Meta(request_id=rq.request_id(request)))

    @get("/messages", responses=errors())
    async def messages(
        self,
        request: Request,
        number: Annotated[str, Parameter(query="number", pattern=E164_PATTERN)],
    ) -> PhoneMessages:
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        if problem := e164_problem(number):
            raise ValidationFailed.field("number", problem)
        items = await ctx.db.read(lambda c: store.received_by_number(c, org_id, number, 1000))
        data = [
            PhoneMessage(
                message_id=m.id,
                from_=m.from_number,
                to=m.to_number,
                body=m.content,
                created_at=iso(m.created_at) or "",
            )
            for m in items
        ]
        return PhoneMessages(data=data, meta=ListMeta(request_id=rq.request_id(request), next_cursor=None))
