"""Agents (SPEC §5): managed ones are listed and read; custom ones are created, changed and deleted."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import msgspec
from litestar import Controller, Request, delete, get, patch, post
from litestar.params import Parameter

from app.api import requests as rq
from app.api.schemas import ListMeta, Meta, errors, json_body
from app.clock import iso
from app.domain import agent_registry
from app.domain.agents import Agent, AgentPatch, AgentSettings, Tool
from app.domain.context import Context
from app.domain.ids import parse_uuid
from app.domain.types import StrictDecoder
from app.llm import tools as llm_tools
from app.store import agents as store

settings_decoder = StrictDecoder(AgentSettings)
patch_decoder = StrictDecoder(AgentPatch)


class AgentEnvelope(msgspec.Struct):
    data: dict[str, Any]
    meta: Meta


class AgentList(msgspec.Struct):
    data: list[dict[str, Any]]
    meta: ListMeta


def agent_out(agent: Agent, tool_secret: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"agentId": agent.id, "kind": agent.kind, "slug": agent.slug}
    out.update(msgspec.to_builtins(agent.settings))
    out["createdAt"] = iso(agent.created_at)
    out["updatedAt"] = iso(agent.updated_at)
    if tool_secret is not None:
        out["toolSecret"] = tool_secret
    return out


def _forget(ctx: Context, agent_id: str | None) -> None:
    """Creates must see an agent's change at once: drop it from their cache."""
    ctx.agents.discard(lambda agent: agent.id == agent_id)


async def check_tool_urls(tools: list[Tool], ctx: Context) -> None:
    """The registration-time tool rules, the URL guard's DNS look-up included, off the event loop and
    before any write (a look-up on the writer's thread would stall every write)."""
    await anyio.to_thread.run_sync(lambda: llm_tools.check_tools(tools, ctx.settings))


class AgentController(Controller):
    path = "/v1/agents"
    tags = ["Agents"]

    @post("/", status_code=201, operation_class=json_body(AgentSettings), responses=errors(413, 415))
    async def create(self, request: Request) -> AgentEnvelope:
        ctx = rq.context(request)
        settings = await rq.read_json(request, settings_decoder)
        org_id = rq.org_of(request)
        await check_tool_urls(settings.tools, ctx)
        agent = await ctx.db.write(lambda c: agent_registry.create_custom(c, org_id, settings, ctx.clock.now_ms()))
        return AgentEnvelope(data=agent_out(agent, agent.tool_secret), meta=Meta(request_id=rq.request_id(request)))

    @get("/", responses=errors())
    async def list_agents(
        self,
        request: Request,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        cursor: str | None = None,
    ) -> AgentList:
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        scope = rq.cursor_scope("agents", org_id)
        after = rq.decode_cursor(cursor, scope, (int, str))
        rows = await ctx.db.read(lambda c: store.list_visible(c, org_id, after=after, limit=limit + 1))  # type: ignore[arg-type]
        agents, more = rq.page(rows, limit)
        next_cursor = rq.encode_cursor(scope, agents[-1].created_at, agents[-1].id) if more else None
        return AgentList(
            data=[agent_out(a) for a in agents],
            meta=ListMeta(request_id=rq.request_id(request), next_cursor=next_cursor),
        )

    @get("/{agent_id:str}", responses=errors(404))
    async def get_agent(self, request: Request, agent_id: str) -> AgentEnvelope:
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        agent = await ctx.db.read(lambda c: agent_registry.get_visible(c, org_id, agent_id))
        return AgentEnvelope(data=agent_out(agent), meta=Meta(request_id=rq.request_id(request)))

    @patch("/{agent_id:str}", operation_class=json_body(AgentPatch), responses=errors(404, 413, 415))
    async def update(self, request: Request, agent_id: str) -> AgentEnvelope:
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        await ctx.db.read(lambda c: agent_registry.get_own(c, org_id, agent_id))
        changes = await rq.read_json(request, patch_decoder)
        if changes.tools is not msgspec.UNSET:
            await check_tool_urls(changes.tools, ctx)
        agent = await ctx.db.write(
            lambda c: agent_registry.update_custom(c, org_id, agent_id, changes, ctx.clock.now_ms())
        )
        _forget(ctx, agent.id)
        return AgentEnvelope(data=agent_out(agent), meta=Meta(request_id=rq.request_id(request)))

    @delete("/{agent_id:str}", status_code=204, responses=errors(404, 415))
    async def delete_agent(self, request: Request, agent_id: str) -> None:
        await rq.no_body(request)
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        await ctx.db.write(lambda c: agent_registry.delete_custom(c, org_id, agent_id, ctx.clock.now_ms()))
        _forget(ctx, parse_uuid(agent_id))

    @post("/{agent_id:str}/rotate-tool-secret", status_code=200, responses=errors(404, 415))
    async def rotate_tool_secret(self, request: Request, agent_id: str) -> AgentEnvelope:
        await rq.no_body(request)
        ctx = rq.context(request)
        org_id = rq.org_of(request)
        agent, secret = await ctx.db.write(
            lambda c: agent_registry.rotate_tool_secret(c, org_id, agent_id, ctx.clock.now_ms())
        )
        _forget(ctx, agent.id)
        return AgentEnvelope(data=agent_out(agent, secret), meta=Meta(request_id=rq.request_id(request)))
