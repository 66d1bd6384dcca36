"""Assistant turnaround: from an inbound SMS being accepted to the reply being handed to the provider.

The whole path runs for real: the inbound goes through `POST /v1/simulator/inbound` (stored, routed,
emitted), the debounced `assistant_turn` job is claimed by the scheduler, the model is called through
the `openai` client over loopback (a scripted server that answers at once), and the reply goes through
`send_in_conversation` to the simulator provider, whose `send` is where the clock stops. The debounce
window is 0, so the number is Parley's own overhead.

    .venv/bin/python -m bench.turnaround_bench [--rate 100] [--seconds 10] [--conversations 100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path

from app.providers.base import SendAccepted, SendRequest
from app.providers.simulator import SimulatorProvider
from tests.conftest import start_harness
from tests.fake_llm import FakeLLM

OURS = "+15555550100"


class TimedProvider(SimulatorProvider):
    """The simulator, noting when each SMS to a customer is handed over."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[str, deque[float]] = defaultdict(deque)  # customer number -> accepted-at of inbound
        self.latencies: list[float] = []

    async def send(self, request: SendRequest) -> SendAccepted:
        now = time.perf_counter()
        waiting = self.pending.get(request.to_number)
        while waiting:  # texts merged into one turn are all answered by this reply
            self.latencies.append(now - waiting.popleft())
        return await super().send(request)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def run(rate: float, seconds: float, conversations: int) -> None:
    provider = TimedProvider()
    with FakeLLM(default_reply="Thanks, noted.") as llm, tempfile.TemporaryDirectory() as tmp:
        async with start_harness(
            Path(tmp), provider=provider, llm_base_url=llm.base_url, llm_model="bench", rate_limit=1_000_000.0
        ) as h:
            agent = await h.post("/v1/agents", {"name": "bench", "systemPrompt": "Be brief.", "replyDebounceMs": 0})
            agent_id = agent.json()["data"]["agentId"]
            customers = [f"+1555560{i:04d}" for i in range(conversations)]
            for number in customers:
                created = await h.post(
                    "/v1/sms-conversations",
                    {"agentId": agent_id, "toNumber": number, "fromNumber": OURS, "welcomeMessage": "Hi"},
                )
                assert created.status_code == 201, created.text

            total = int(rate * seconds)
            errors = 0

            async def text(number: str, index: int) -> None:
                nonlocal errors
                response = await h.post("/v1/simulator/inbound", {"from": number, "to": OURS, "body": f"msg {index}"})
                if response.status_code != 201:
                    errors += 1
                    return
                provider.pending[number].append(time.perf_counter())

            print(f"{total} inbound texts at {rate:g}/s across {conversations} conversations, debounce 0 ...")
            started = time.perf_counter()
            tasks = []
            for index in range(total):
                delay = started + index / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(text(customers[index % conversations], index)))
            await asyncio.gather(*tasks)
            offered = time.perf_counter() - started
            deadline = time.perf_counter() + 30
            while any(provider.pending.values()) and time.perf_counter() < deadline:
                await asyncio.sleep(0.05)
            unanswered = sum(len(q) for q in provider.pending.values())

    lat = [x * 1000 for x in provider.latencies]
    print(f"offered rate   {total / offered:8.1f} inbound/s  ({errors} rejected, {unanswered} unanswered after 30 s)")
    merged = total - len(llm.bodies) - unanswered
    print(f"model requests {len(llm.bodies):8d}  ({merged} texts answered together with another)")
    if lat:
        print(f"turnaround p50 {statistics.median(lat):8.1f} ms")
        print(f"turnaround p99 {percentile(lat, 0.99):8.1f} ms")
        print(f"turnaround max {max(lat):8.1f} ms")
        print(f"p99 / p50      {percentile(lat, 0.99) / statistics.median(lat):8.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="inbound texts per second (default 100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to offer load (default 10)")
    parser.add_argument("--conversations", type=int, default=100, help="conversations to spread them over")
    args = parser.parse_args()
    asyncio.run(run(args.rate, args.seconds, args.conversations))


if __name__ == "__main__":
    main()
