"""A model-based (stateful) test of the conversation lifecycle (SPEC §3, §4, the compliance keywords of §5).

A Hypothesis `RuleBasedStateMachine` keeps a small model of what the contract says and drives the real app
(lifespan included) in-process over ASGI, on a fake clock, with the simulator provider and a loopback fake model:

- conversations per (fromNumber, toNumber) pair, at most one in progress, supersede on create, the provider's
  refusal (`+15005550001`) and its accepted-then-failed number (`+15005550009`);
- close (with and without a reason, twice), operator messages, inactivity closes (with a closing message);
- simulator inbound texts: ordinary ones (answered by the model), STOP/START/HELP keywords in their spellings,
  texts to closed conversations and from pairs an organization never used;
- two organizations sharing a pool of sender numbers (README: a number belongs to the organization that first
  sent from it), each with its own custom agent, and the managed `recall-sms`;
- Idempotency-Key replays.

After every step the server's state is compared with the model: every conversation through the list
(status, endReason, supersededBy, messageCount, lastActivityAt, ...), the org's whole event log (per-conversation
`sequence` gap-free and in order, the events' types and data, no other org's events), and the messages of the
conversations the step touched (order, sequence numbers, authors, statuses, error codes). Rules also walk the
list with small pages and filters, read the simulated phone, and try every write on the other org's resources.

One app serves every example; each example uses two new organizations and new sender numbers, so examples never
see each other's state. After each step the test waits until nothing is due (turns, inactivity timers) and
no outbound message of its organizations is still queued/sent, then moves the fake clock 2 s (so the managed
agent's 1.5 s-debounced turn runs) and waits again: what the model predicts is then fully settled.

Budget: PARLEY_MODEL_EXAMPLES (default 25), PARLEY_MODEL_STEPS (default 25), PARLEY_MODEL_SEED (default 0).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    get_state_machine_test,
    initialize,
    invariant,
    precondition,
    rule,
)

from app.api.app import create_app
from app.clock import FakeClock, iso
from app.providers.simulator import SimulatorProvider
from tests.conftest import create_key, make_settings, query
from tests.fake_llm import FakeLLM
from tests.lifespan import Lifespan

T = TypeVar("T")

REPLY = "Thanks, noted."  # the fake model's answer to every turn
REJECTED = "+15005550001"  # the simulator refuses sends to it (21211)
FAILS = "+15005550009"  # accepted, then failed (30003)
CUSTOMERS = ["+15555550199", "+15555550188", REJECTED, FAILS]
DEFAULT_HELP = "Reply STOP to unsubscribe. Msg&data rates may apply."
RECALL_HELP = "Recall follow-up texts from your dealership. Reply STOP to opt out. Msg&data rates may apply."
OPT_OUT_CONFIRMATION = (
    "You have been unsubscribed and will receive no more messages from this number. Reply START to resubscribe."
)
OPT_IN_CONFIRMATION = (
    "You have been resubscribed and may receive messages from this number again. Reply STOP to unsubscribe."
)
CLOSING = "Closing this chat for now. Text us any time."
RECALL_VARS = {"customerName": "Ada", "dealershipName": "PAM Motors", "recallId": "24V-123"}
OPT_OUT_WORDS = {"STOP", "STOPALL", "STOP ALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "OPT-OUT"}
OPT_IN_WORDS = {"START", "UNSTOP", "YES"}
HELP_WORDS = {"HELP", "INFO"}
BODIES = [
    "Is the repair free?",
    "Hello there",
    "stop texting me",
    "STOP",
    " stop ",
    "Stop  All",
    "unsubscribe",
    "START",
    "yes",
    "HELP",
    "info",
]
_example_numbers = itertools.count(1)
COVERAGE: collections.Counter[str] = collections.Counter()  # what the runs reached (PARLEY_MODEL_STATS=1 prints it)


def normalize(body: str) -> str:
    return " ".join(body.split()).upper()


# --- the app, on its own event loop in a thread (Hypothesis' state machines are synchronous) -------------------


class Runtime:
    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.llm = FakeLLM(default_reply=REPLY).start()
        self.settings = make_settings(tmp_path, llm_base_url=self.llm.base_url, llm_model="test-model")
        self.database = self.settings.database
        self.run(self._boot())

    async def _boot(self) -> None:
        self.clock = FakeClock()
        self.app = create_app(self.settings, clock=self.clock, provider=SimulatorProvider(report_delay=0.002))
        self.lifespan = Lifespan(self.app)
        await self.lifespan.__aenter__()
        transport = httpx.ASGITransport(app=self.app)  # type: ignore[arg-type]
        self.client = httpx.AsyncClient(transport=transport, base_url="http://testserver.local")

    async def _shutdown(self) -> None:
        await self.client.aclose()
        await self.lifespan.__aexit__(None, None, None)

    def close(self) -> None:
        try:
            self.run(self._shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.llm.stop()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def now(self) -> int:
        return self.clock.now_ms()

    def advance(self, seconds: float) -> None:
        self.run(self.clock.advance(seconds))

    def rows(self, sql: str, *args: Any) -> list[Any]:
        return query(self.database, sql, *args)

    def quiesce(self, org_ids: list[str]) -> None:
        """Until nothing is due on the fake clock and no outbound message of these orgs is on its way."""
        marks = ",".join("?" * len(org_ids))
        deadline = time.monotonic() + 20
        calm = 0
        while calm < 2:
            now = self.now()
            due = self.rows("SELECT COUNT(*) FROM jobs WHERE due_at <= ?", now)[0][0]
            moving = self.rows(
                f"SELECT COUNT(*) FROM messages WHERE direction = 'outbound' AND status IN ('queued', 'sent')"
                f" AND org_id IN ({marks})",
                *org_ids,
            )[0][0]
            calm = calm + 1 if due == 0 and moving == 0 else 0
            if time.monotonic() > deadline:
                raise AssertionError(f"the app never settled: {due} job(s) due, {moving} message(s) on their way")
            time.sleep(0.003)


# --- the model ------------------------------------------------------------------------------------------------


@dataclass
class MMessage:
    direction: str
    author: str
    content: str
    status: str
    error_code: str | None = None
    at: int = 0  # createdAt (fake clock, ms)


@dataclass
class MConversation:
    id: str
    org: str
    agent: str  # "custom" | "recall"
    agent_id: str
    from_number: str
    to_number: str
    created_at: int
    last_activity: int
    timeout_s: int
    status: str = "in_progress"
    end_reason: str | None = None
    ended_at: int | None = None
    superseded_by: str | None = None
    messages: list[MMessage] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # in order, delivery updates apart
    deliveries: list[tuple[str, str]] = field(default_factory=list)  # (previousStatus, status), any order


@dataclass
class MOrg:
    name: str
    org_id: str
    key: str
    custom_agent_id: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # events with no conversation
    idempotency: dict[str, tuple[dict[str, Any], int, Any, int, str]] = field(default_factory=dict)


class LifecycleMachine(RuleBasedStateMachine):
    runtime: Runtime  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.rt = type(self).runtime
        self.orgs: dict[str, MOrg] = {}
        self.convs: list[MConversation] = []
        self.opt_outs: set[tuple[str, str, str]] = set()  # (org, ours, customer)
        self.owner: dict[str, str] = {}  # sender number → org that sent from it
        self.touched: set[str] = set()
        self.settled = True
        self.checks_passed = True  # False once a check failed: teardown then adds no second failure

    # --- plumbing -----------------------------------------------------------------------------------------------

    def call(self, method: str, path: str, org: str, body: Any = None, **params: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.orgs[org].key}"}
        extra = params.pop("_headers", {})
        headers.update(extra)
        content = None
        if body is not None:
            content = msgspec.json.encode(body)
            headers["Content-Type"] = "application/json"
        return self.rt.run(
            self.rt.client.request(method, path, headers=headers, content=content, params=params or None)
        )

    def tick(self) -> int:
        self.settled = False
        self.rt.advance(1)
        return self.rt.now()

    def settle(self) -> None:
        ids = [o.org_id for o in self.orgs.values()]
        self.rt.quiesce(ids)
        self.rt.advance(2)  # the managed agent's 1.5 s debounce
        self.rt.quiesce(ids)
        self.settled = True

    def conv(self, conversation_id: str) -> MConversation:
        return next(c for c in self.convs if c.id == conversation_id)

    def open_for_pair(self, ours: str, customer: str) -> list[MConversation]:
        return [c for c in self.convs if (c.from_number, c.to_number) == (ours, customer) and c.status != "closed"]

    def latest_for_pair(self, org: str, ours: str, customer: str) -> MConversation | None:
        mine = [c for c in self.convs if c.org == org and (c.from_number, c.to_number) == (ours, customer)]
        if not mine:
            return None
        return max(mine, key=lambda c: (c.status == "in_progress", c.created_at))

    def close_model(self, c: MConversation, reason: str, at: int, superseded_by: str | None = None) -> None:
        assert c.status != "closed"
        c.status, c.end_reason, c.ended_at, c.superseded_by = "closed", reason, at, superseded_by
        c.events.append(("sms.conversation_closed", {"endReason": reason, "supersededBy": superseded_by}))
        self.touched.add(c.id)

    def outbound(self, c: MConversation, author: str, content: str, at: int, activity: bool) -> None:
        """An outbound SMS handed to the simulator: accepted (then delivered or failed) or refused."""
        self.touched.add(c.id)
        if c.to_number == REJECTED:
            c.messages.append(MMessage("outbound", author, content, "failed", "21211", at))
            c.deliveries.append(("queued", "failed"))
            return
        final, code = ("failed", "30003") if c.to_number == FAILS else ("delivered", None)
        c.messages.append(MMessage("outbound", author, content, final, code, at))
        c.events.append(("sms.message_sent", {"content": content}))
        c.deliveries += [("queued", "sent"), ("sent", final)]
        if activity and c.status == "in_progress":
            c.last_activity = at

    def help_text(self, c: MConversation) -> str:
        if c.agent == "recall":
            return RECALL_HELP
        if c.agent == "fixed":
            return DEFAULT_HELP
        return "Help for Ada: call us." if c.org == "A" else DEFAULT_HELP

    # --- set-up -------------------------------------------------------------------------------------------------

    @initialize()
    def setup(self) -> None:
        n = next(_example_numbers)
        self.numbers = [f"+1555{n % 100000:05d}{k:02d}" for k in range(3)]
        for name in ("A", "B"):
            org_name = f"model-{os.getpid()}-{n}-{name}"
            key = create_key(self.rt.database, org_name)
            org_id = self.rt.rows("SELECT id FROM orgs WHERE name = ?", org_name)[0][0]
            self.orgs[name] = MOrg(name, org_id, key, "")
            agent: dict[str, Any] = {
                "name": f"Agent {name}",
                "systemPrompt": "You text {{customerName}}.",
                "replyDebounceMs": 0,
            }
            if name == "A":
                agent |= {"helpMessage": "Help for {{customerName}}: call us.", "closingMessage": CLOSING}
            response = self.call("POST", "/v1/agents", name, agent)
            assert response.status_code == 201, response.text
            self.orgs[name].custom_agent_id = response.json()["data"]["agentId"]
        # A custom agent of A's with its own number (the third of the pool): it sends from it whatever the create's
        # fromNumber, and the number is A's from the start (README: given to an agent, a number is claimed).
        fixed = {
            "name": "Fixed",
            "systemPrompt": "You are terse.",
            "replyDebounceMs": 0,
            "phoneNumber": self.numbers[2],
        }
        response = self.call("POST", "/v1/agents", "A", fixed)
        assert response.status_code == 201, response.text
        self.fixed_id = response.json()["data"]["agentId"]
        self.owner[self.numbers[2]] = "A"
        recall = self.call("GET", "/v1/agents", "A", limit=100).json()["data"]
        self.recall_id = next(a["agentId"] for a in recall if a.get("slug") == "recall-sms")

    # --- creates ------------------------------------------------------------------------------------------------

    def create_body(self, org: str, agent: str, ours: str, customer: str, timeout: bool, text: str) -> dict[str, Any]:
        body: dict[str, Any] = {"toNumber": customer, "fromNumber": ours, "welcomeMessage": text}
        if agent == "recall":
            body |= {"agentSlug": "recall-sms", "dynamicVariables": RECALL_VARS}
        elif agent == "fixed":  # A's agent: another org's create names an agent it cannot see (404)
            body |= {"agentId": self.fixed_id, "dynamicVariables": {"customerName": "Ada"}}
        else:
            body |= {"agentId": self.orgs[org].custom_agent_id, "dynamicVariables": {"customerName": "Ada"}}
        if timeout:
            body["inactivityTimeoutSeconds"] = 3600
        return body

    def expect_create(self, org: str, agent: str, body: dict[str, Any], response: httpx.Response, now: int) -> None:
        ours, customer = body["fromNumber"], body["toNumber"]
        if agent == "fixed":
            if org != "A":
                assert response.status_code == 404, response.text
                COVERAGE["create: another org's agent 404"] += 1
                return
            ours = self.numbers[2]  # the agent's number, whatever fromNumber says
        if self.owner.get(ours, org) != org:
            COVERAGE["create: another org's number 400"] += 1
            assert response.status_code == 400, response.text
            fields = [d["field"] for d in response.json()["error"]["details"]]
            assert fields == ["fromNumber"], response.text
            return
        if (org, ours, customer) in self.opt_outs:
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "recipient_opted_out"
            COVERAGE["create: opted out 409"] += 1
            return
        agent_id = {"recall": self.recall_id, "fixed": self.fixed_id}.get(agent, self.orgs[org].custom_agent_id)
        timeout = body.get("inactivityTimeoutSeconds", 86400)
        if customer == REJECTED:
            assert response.status_code == 502, response.text
            error = response.json()["error"]
            assert (error["code"], error["providerCode"]) == ("provider_error", "21211"), error
            c = MConversation(error["conversationId"], org, agent, agent_id, ours, customer, now, now, timeout)
            self.convs.append(c)
            self.outbound(c, "agent", body["welcomeMessage"], now, False)
            c.status = "pending"
            self.close_model(c, "opening_message_failed", now)
            COVERAGE["create: provider refused 502"] += 1
            return
        assert response.status_code == 201, response.text
        data = response.json()["data"]
        assert data["status"] == "in_progress" and data["providerMessageId"].startswith("SM"), data
        c = MConversation(data["conversationId"], org, agent, agent_id, ours, customer, now, now, timeout)
        for other in self.open_for_pair(ours, customer):
            self.close_model(other, "superseded_by_new_conversation", now, superseded_by=c.id)
            COVERAGE["create: supersede"] += 1
        COVERAGE[f"create: 201 ({agent})"] += 1
        self.convs.append(c)
        self.outbound(c, "agent", body["welcomeMessage"], now, True)
        self.owner[ours] = org

    @rule(
        org=st.sampled_from("AB"),
        agent=st.sampled_from(["custom", "recall", "fixed"]),
        ours=st.integers(0, 2),
        # Mostly customers the simulator reaches: conversations that stay open are where most rules have work.
        customer=st.sampled_from([*CUSTOMERS[:2] * 3, *CUSTOMERS[2:]]),
        timeout=st.booleans(),
        idempotent=st.booleans(),
    )
    def create(self, org: str, agent: str, ours: int, customer: str, timeout: bool, idempotent: bool) -> None:
        now = self.tick()
        body = self.create_body(org, agent, self.numbers[ours], customer, timeout, f"Hello #{now}")
        headers = {}
        key = None
        if idempotent:
            key = f"key-{now}"
            headers["Idempotency-Key"] = key
        response = self.call("POST", "/v1/sms-conversations", org, body, _headers=headers)
        assert "Idempotent-Replayed" not in response.headers
        self.expect_create(org, agent, body, response, now)
        if key is not None and response.status_code in (201, 502):
            self.orgs[org].idempotency[key] = (body, response.status_code, response.json(), now, agent)
        self.settle()

    def live_keys(self) -> list[tuple[str, str]]:
        """Idempotency keys still kept (24 h on the fake clock, with a margin)."""
        now = self.rt.now()
        return [
            (name, key)
            for name, org in sorted(self.orgs.items())
            for key, (*_, at, _agent) in sorted(org.idempotency.items())
            if now - at < 86_000_000
        ]

    @precondition(lambda self: self.live_keys())
    @rule(data=st.data(), how=st.sampled_from(["same", "same", "edited", "other_org"]))
    def replay(self, data: st.DataObject, how: str) -> None:
        now = self.tick()
        org, key = data.draw(st.sampled_from(self.live_keys()))
        body, status, first, _, agent = self.orgs[org].idempotency[key]
        COVERAGE[f"replay: {how}"] += 1
        if how == "other_org":
            # Keys are scoped to the org: in the other org the same key is a new create.
            other = "B" if org == "A" else "A"
            if key in self.orgs[other].idempotency:
                return self.settle()
            sent = self.create_body(
                other, agent, body["fromNumber"], body["toNumber"], "inactivityTimeoutSeconds" in body, f"Hi #{now}"
            )
            response = self.call("POST", "/v1/sms-conversations", other, sent, _headers={"Idempotency-Key": key})
            assert "Idempotent-Replayed" not in response.headers, response.headers
            self.expect_create(other, agent, sent, response, now)
            if response.status_code in (201, 502) and key not in self.orgs[other].idempotency:
                self.orgs[other].idempotency[key] = (sent, response.status_code, response.json(), now, agent)
            return self.settle()
        sent = body if how == "same" else {**body, "welcomeMessage": body["welcomeMessage"] + " (edited)"}
        response = self.call("POST", "/v1/sms-conversations", org, sent, _headers={"Idempotency-Key": key})
        if how == "same":
            assert response.status_code == status, response.text
            assert response.headers.get("Idempotent-Replayed") == "true"
            assert response.json() == first
        else:
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "idempotency_key_reused"
        self.settle()

    # --- close and operator messages ------------------------------------------------------------------------

    @precondition(lambda self: self.convs)
    @rule(
        data=st.data(),
        by=st.sampled_from(["owner", "other"]),
        reason=st.sampled_from([None, "customer_resolved", "null"]),
    )
    def close(self, data: st.DataObject, by: str, reason: str | None) -> None:
        now = self.tick()
        c = data.draw(st.sampled_from(self.convs))
        org = c.org if by == "owner" else ("B" if c.org == "A" else "A")
        body = None if reason is None else {"reason": None} if reason == "null" else {"reason": reason}
        reason = None if reason == "null" else reason
        response = self.call("POST", f"/v1/sms-conversations/{c.id}/close", org, body)
        if org != c.org:
            assert response.status_code == 404, response.text
            return self.settle()
        assert response.status_code == 200, response.text
        got = response.json()["data"]
        if c.status == "closed":
            COVERAGE["close: already closed"] += 1
            assert got["alreadyClosed"] is True, got
        else:
            self.close_model(c, reason or "admin_closed", now)
            assert got["alreadyClosed"] is False, got
        assert (got["status"], got["endReason"], got["endedAt"]) == ("closed", c.end_reason, iso(c.ended_at)), got
        self.settle()

    @precondition(lambda self: self.convs)
    @rule(data=st.data(), by=st.sampled_from(["owner", "owner", "other"]))
    def operator_message(self, data: st.DataObject, by: str) -> None:
        now = self.tick()
        c = data.draw(st.sampled_from(self.convs))
        org = c.org if by == "owner" else ("B" if c.org == "A" else "A")
        content = f"An operator here ({now})."
        response = self.call("POST", f"/v1/sms-conversations/{c.id}/messages", org, {"content": content})
        if org != c.org:
            assert response.status_code == 404, response.text
        elif c.status == "closed":
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "conversation_closed"
        elif (c.org, c.from_number, c.to_number) in self.opt_outs:
            assert response.status_code == 409, response.text
            assert response.json()["error"]["code"] == "recipient_opted_out"
        else:
            assert response.status_code == 201, response.text
            got = response.json()["data"]
            assert (got["author"], got["direction"], got["content"]) == ("operator", "outbound", content), got
            assert got["sequenceNumber"] == len(c.messages) + 1, got
            self.outbound(c, "operator", content, now, True)
        self.settle()

    # --- inbound texts ------------------------------------------------------------------------------------------

    @rule(
        org=st.sampled_from("AB"),
        ours=st.integers(0, 2),
        customer=st.sampled_from(CUSTOMERS),
        body=st.sampled_from(BODIES),
    )
    def inbound(self, org: str, ours: int, customer: str, body: str) -> None:
        self.text_in(org, self.numbers[ours], customer, body)

    @precondition(lambda self: self.convs)
    @rule(data=st.data(), body=st.sampled_from(BODIES), by=st.sampled_from(["owner"] * 4 + ["other"]))
    def customer_replies(self, data: st.DataObject, body: str, by: str) -> None:
        """The customer of an existing conversation texts its number (through either org's simulator key)."""
        open_ones = [c for c in self.convs if c.status == "in_progress"]
        pool = open_ones if open_ones and data.draw(st.integers(0, 3)) else self.convs  # mostly an open one
        c = data.draw(st.sampled_from(pool))
        org = c.org if by == "owner" else ("B" if c.org == "A" else "A")
        self.text_in(org, c.from_number, c.to_number, body)

    @precondition(lambda self: self.opt_outs)
    @rule(data=st.data(), body=st.sampled_from(["START", "unstop", "Yes", "HELP", "STOP", "Hello again"]))
    def listed_pair_texts(self, data: st.DataObject, body: str) -> None:
        """A customer on an org's opt-out list texts its number again."""
        org, ours, customer = data.draw(st.sampled_from(sorted(self.opt_outs)))
        self.text_in(org, ours, customer, body)

    @precondition(lambda self: self.opt_outs)
    @rule(data=st.data(), agent=st.sampled_from(["custom", "recall"]))
    def create_on_listed_pair(self, data: st.DataObject, agent: str) -> None:
        org, ours, customer = data.draw(st.sampled_from(sorted(self.opt_outs)))
        now = self.tick()
        body = self.create_body(org, agent, ours, customer, False, f"Back #{now}")
        response = self.call("POST", "/v1/sms-conversations", org, body)
        self.expect_create(org, agent, body, response, now)
        self.settle()

    def text_in(self, org: str, our_number: str, customer: str, body: str) -> None:
        now = self.tick()
        response = self.call("POST", "/v1/simulator/inbound", org, {"from": customer, "to": our_number, "body": body})
        assert response.status_code == 201, response.text
        got = response.json()["data"]
        c = self.latest_for_pair(org, our_number, customer)
        if c is None:
            COVERAGE["inbound: unrouted"] += 1
            assert got["conversationId"] is None, (got, "a pair this org never used is stored unrouted")
            return self.settle()
        assert got["conversationId"] == c.id, (got, c.id, c.status)
        routed = c.status == "in_progress"
        self.touched.add(c.id)
        c.messages.append(MMessage("inbound", "customer", body, "received", None, now))
        c.events.append(("sms.message_received", {"content": body, "routed": routed}))
        if routed:
            c.last_activity = now
        word = normalize(body)
        pair = (org, our_number, customer)
        kind = (
            "stop"
            if word in OPT_OUT_WORDS
            else "help"
            if word in HELP_WORDS
            else "start"
            if word in OPT_IN_WORDS
            else "text"
        )
        listed = "listed" if pair in self.opt_outs else "not listed"
        COVERAGE[f"inbound: {kind}, {'open' if routed else 'closed'}, {listed}"] += 1
        contact = {"phoneNumber": customer, "senderNumber": our_number, "keyword": word}
        if word in OPT_OUT_WORDS:
            open_c = c if routed else None
            added = pair not in self.opt_outs
            self.opt_outs.add(pair)
            if added or open_c is not None:
                (open_c.events if open_c else self.orgs[org].events).append(("contact.opt_out", contact))
                if open_c is not None:
                    self.close_model(open_c, "opted_out", now)
            if added:
                self.outbound(open_c or c, "system", OPT_OUT_CONFIRMATION, now, False)
        elif word in OPT_IN_WORDS and pair in self.opt_outs:
            self.opt_outs.discard(pair)
            (c.events if routed else self.orgs[org].events).append(("contact.opt_in", contact))
            self.outbound(c, "system", OPT_IN_CONFIRMATION, now, False)
        elif word in HELP_WORDS:
            self.outbound(c, "system", self.help_text(c), now, False)
        elif routed:
            # The model's turn: at once for the custom agents (debounce 0), after the 2 s settle for recall-sms.
            self.outbound(c, "agent", REPLY, now + 2000 if c.agent == "recall" else now, True)
        self.settle()

    # --- time ---------------------------------------------------------------------------------------------------

    @rule()
    def inactivity(self) -> None:
        self.tick()
        self.rt.advance(3700)
        now = self.rt.now()
        for c in self.convs:
            if c.status == "in_progress" and now - c.last_activity >= c.timeout_s * 1000:
                COVERAGE["inactivity close"] += 1
                if c.agent == "custom" and c.org == "A":
                    self.outbound(c, "system", CLOSING, now, False)
                self.close_model(c, "inactivity_timeout", now)
        self.settle()

    # --- reads --------------------------------------------------------------------------------------------------

    @rule(
        org=st.sampled_from("AB"),
        limit=st.integers(1, 4),
        status=st.sampled_from([None, "in_progress", "closed"]),
        filter_by=st.sampled_from([None, "fromNumber", "toNumber", "agentId"]),
        data=st.data(),
    )
    def list_pages(self, org: str, limit: int, status: str | None, filter_by: str | None, data: st.DataObject) -> None:
        params: dict[str, Any] = {"limit": limit}
        expected = [c for c in self.convs if c.org == org]
        if status:
            params["status"] = status
            expected = [c for c in expected if (c.status == "closed") == (status == "closed")]
        if filter_by == "fromNumber":
            value = data.draw(st.sampled_from(self.numbers))
            expected = [c for c in expected if c.from_number == value]
        elif filter_by == "toNumber":
            value = data.draw(st.sampled_from(CUSTOMERS))
            expected = [c for c in expected if c.to_number == value]
        elif filter_by == "agentId":
            value = data.draw(st.sampled_from([self.recall_id, self.orgs["A"].custom_agent_id, self.fixed_id]))
            expected = [c for c in expected if c.agent_id == value]
        if filter_by:
            params[filter_by] = value
        seen: list[str] = []
        cursor = None
        for _ in range(200):
            if cursor:
                params["cursor"] = cursor
            response = self.call("GET", "/v1/sms-conversations", org, **params)
            assert response.status_code == 200, response.text
            page = response.json()
            assert len(page["data"]) <= limit
            seen += [item["conversationId"] for item in page["data"]]
            cursor = page["meta"]["next_cursor"]
            if cursor is None:
                break
        want = [c.id for c in sorted(expected, key=lambda c: c.created_at, reverse=True)]
        assert seen == want, (params, seen, want)

    @precondition(lambda self: self.convs)
    @rule(data=st.data(), limit=st.integers(1, 5))
    def read_messages(self, data: st.DataObject, limit: int) -> None:
        c = data.draw(st.sampled_from(self.convs))
        self.check_messages(c, limit)
        other = "B" if c.org == "A" else "A"
        for path in (f"/v1/sms-conversations/{c.id}", f"/v1/sms-conversations/{c.id}/messages"):
            response = self.call("GET", path, other)
            assert response.status_code == 404, (path, response.text)

    @rule(org=st.sampled_from("AB"), customer=st.sampled_from(CUSTOMERS))
    def read_phone(self, org: str, customer: str) -> None:
        """The simulated phone: what it received from this org's conversations, oldest first."""
        response = self.call("GET", "/v1/simulator/messages", org, number=customer)
        assert response.status_code == 200, response.text
        items = response.json()["data"]
        got = sorted((m["createdAt"], m["from"], m["body"]) for m in items)
        want = sorted(
            (iso(m.at), c.from_number, m.content)
            for c in self.convs
            if c.org == org and c.to_number == customer
            for m in c.messages
            if m.direction == "outbound" and m.error_code != "21211"
        )
        assert got == want, (got, want)
        stamps = [m["createdAt"] for m in items]
        assert stamps == sorted(stamps), ("the phone's list is not oldest first", stamps)

    # --- invariants ---------------------------------------------------------------------------------------------

    def check_messages(self, c: MConversation, limit: int = 100) -> None:
        items: list[dict[str, Any]] = []
        cursor = None
        for _ in range(200):
            params: dict[str, Any] = {"limit": limit}
            if cursor:
                params["cursor"] = cursor
            response = self.call("GET", f"/v1/sms-conversations/{c.id}/messages", c.org, **params)
            assert response.status_code == 200, response.text
            items += response.json()["data"]
            cursor = response.json()["meta"]["next_cursor"]
            if cursor is None:
                break
        got = [(m["direction"], m["author"], m["content"], m["status"], m["errorCode"]) for m in items]
        want = [(m.direction, m.author, m.content, m.status, m.error_code) for m in c.messages]
        assert got == want, (c.id, got, want)
        assert [m["sequenceNumber"] for m in items] == list(range(1, len(items) + 1)), items

    def fetch_events(self, org: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = None
        for _ in range(100):
            params: dict[str, Any] = {"limit": 100}
            if after:
                params["after"] = after
            response = self.call("GET", "/v1/events", org, **params)
            assert response.status_code == 200, response.text
            out += response.json()["data"]
            after = response.json()["meta"]["next_cursor"]
            if after is None:
                return out
        raise AssertionError("event log never ended")

    @invariant()
    def conversations_match(self) -> None:
        if not self.orgs or not self.settled:
            return
        self.checks_passed = False
        open_pairs: list[tuple[str, str]] = []
        items_by_id: list[dict[str, Any]] = []
        for name in self.orgs:
            response = self.call("GET", "/v1/sms-conversations", name, limit=100)
            assert response.status_code == 200, response.text
            items = response.json()["data"]
            items_by_id += items
            mine = sorted((c for c in self.convs if c.org == name), key=lambda c: c.created_at, reverse=True)
            assert [i["conversationId"] for i in items] == [c.id for c in mine], (name, items, mine)
            for item, c in zip(items, mine, strict=True):
                want = {
                    "status": c.status,
                    "endReason": c.end_reason,
                    "supersededBy": c.superseded_by,
                    "messageCount": len(c.messages),
                    "fromNumber": c.from_number,
                    "toNumber": c.to_number,
                    "agentId": c.agent_id,
                    "agentSlug": "recall-sms" if c.agent == "recall" else None,
                    "createdAt": iso(c.created_at),
                    "lastActivityAt": iso(c.last_activity),
                    "assistantPaused": False,
                    "endedAt": iso(c.ended_at),
                    "dynamicVariables": RECALL_VARS if c.agent == "recall" else {"customerName": "Ada"},
                }
                got = {k: item[k] for k in want}
                assert got == want, (c.id, got, want)
            open_pairs += [(i["fromNumber"], i["toNumber"]) for i in items if i["status"] != "closed"]
        assert len(open_pairs) == len(set(open_pairs)), ("two open conversations on one pair", open_pairs)
        for c in self.convs:
            if c.id in self.touched:
                one = self.call("GET", f"/v1/sms-conversations/{c.id}", c.org)
                assert one.status_code == 200, one.text
                listed = next(i for i in items_by_id if i["conversationId"] == c.id)
                assert one.json()["data"] == listed, (one.json()["data"], listed)
                self.check_messages(c)
        self.touched.clear()
        self.checks_passed = True

    @invariant()
    def events_match(self) -> None:
        if not self.orgs or not self.settled:
            return
        self.checks_passed = False
        client_org_ids = set()
        for name, org in self.orgs.items():
            events = self.fetch_events(name)
            client_org_ids |= {e["clientOrgId"] for e in events}
            assert len({e["clientOrgId"] for e in events}) <= 1, "events of two orgs in one log"
            mine = {c.id: c for c in self.convs if c.org == name}
            by_conv: dict[str | None, list[dict[str, Any]]] = {}
            for e in events:
                by_conv.setdefault(e["conversationId"], []).append(e)
            assert set(by_conv) - {None} <= set(mine), ("foreign conversations in the log", set(by_conv) - set(mine))
            loose = by_conv.get(None, [])
            assert all(e["sequence"] is None for e in loose), loose
            assert [(e["event"], e["data"]) for e in loose] == org.events, (loose, org.events)
            for cid, c in mine.items():
                got = by_conv.get(cid, [])
                assert [e["sequence"] for e in got] == list(range(1, len(got) + 1)), (cid, got)
                assert all(e["agentId"] == c.agent_id and e["channel"] == "sms" for e in got)
                sent_at = {e["data"]["messageId"]: e["sequence"] for e in got if e["event"] == "sms.message_sent"}
                steps: dict[str, list[tuple[int, str, str]]] = {}
                for e in got:
                    if e["event"] == "sms.message_delivery_updated":
                        d = e["data"]
                        steps.setdefault(d["messageId"], []).append((e["sequence"], d["previousStatus"], d["status"]))
                for message_id, runs in steps.items():
                    # Each change follows the one before it (the simulator reports after the send's answer).
                    assert [p for _, p, _ in runs] == ["queued", *[s for _, _, s in runs[:-1]]], runs
                    if message_id in sent_at:
                        assert all(seq > sent_at[message_id] for seq, _, _ in runs), (sent_at, runs)
                for e in got:
                    d = e["data"]
                    if e["event"] in ("sms.message_sent", "sms.message_received"):
                        inbound = e["event"] == "sms.message_received"
                        want_ends = (c.to_number, c.from_number) if inbound else (c.from_number, c.to_number)
                        assert (d["from"], d["to"]) == want_ends, (c.id, e)
                        assert d["direction"] == ("inbound" if inbound else "outbound"), e
                        assert d["sequenceNumber"] is not None and 1 <= d["sequenceNumber"] <= len(c.messages), e
                        assert c.messages[d["sequenceNumber"] - 1].content == d["content"], (e, c.messages)
                deliveries = [e for e in got if e["event"] == "sms.message_delivery_updated"]
                assert sorted((e["data"]["previousStatus"], e["data"]["status"]) for e in deliveries) == sorted(
                    c.deliveries
                ), (cid, deliveries, c.deliveries)
                rest = [(e["event"], e["data"]) for e in got if e["event"] != "sms.message_delivery_updated"]
                assert [t for t, _ in rest] == [t for t, _ in c.events], (cid, rest, c.events)
                for (kind, data), (_, want) in zip(rest, c.events, strict=True):
                    if kind == "sms.message_received":
                        assert data["content"] == want["content"], data
                        assert data.get("routed", True) == want["routed"], (data, want)
                    elif kind == "sms.message_sent":
                        assert data["content"] == want["content"], data
                    elif kind == "sms.conversation_closed":
                        assert (data["endReason"], data["supersededBy"]) == (want["endReason"], want["supersededBy"])
                    else:
                        assert data == want, (kind, data, want)
        assert len(client_org_ids) <= 2
        self.checks_passed = True

    def teardown(self) -> None:
        if self.settled and self.checks_passed and self.orgs:
            for c in self.convs:
                self.check_messages(c)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Any:
    rt = Runtime(tmp_path_factory.mktemp("model"))
    try:
        yield rt
    finally:
        rt.close()


def test_conversation_lifecycle_matches_the_model(runtime: Runtime) -> None:
    LifecycleMachine.runtime = runtime
    COVERAGE.clear()
    test = get_state_machine_test(
        LifecycleMachine,
        settings=settings(
            max_examples=int(os.environ.get("PARLEY_MODEL_EXAMPLES", "25")),
            stateful_step_count=int(os.environ.get("PARLEY_MODEL_STEPS", "25")),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    try:
        hypothesis_seed(int(os.environ.get("PARLEY_MODEL_SEED", "0")))(test)()
    finally:
        if os.environ.get("PARLEY_MODEL_STATS") == "1":
            print("\n".join(f"{n:6d}  {what}" for what, n in sorted(COVERAGE.items())))
