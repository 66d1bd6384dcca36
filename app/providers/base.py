"""What every SMS provider offers the domain: send, status reports, and a status look-up.

The domain never knows which provider it talks to; a new provider is a new module here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol

import msgspec

from app.domain.models import Message


class SendRequest(msgspec.Struct, frozen=True, kw_only=True):
    message_id: str
    from_number: str
    to_number: str
    body: str
    status_callback_url: str
    # The provider ids already recorded for other messages of the pair: an identical text sent before (by this
    # process or one before a restart) cannot be this one's. Read only when a lost answer must be looked up.
    recorded: Callable[[], Awaitable[Collection[str]]] | None = None


class SendAccepted(msgspec.Struct, frozen=True, kw_only=True):
    provider_message_id: str
    provider_status: str = "queued"
    error_code: str | None = None  # when the answer already says the message failed


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    """A provider's word on one outbound message, in Twilio's status vocabulary."""

    provider_message_id: str
    provider_status: str
    error_code: str | None = None
    message_id: str | None = None
    raw: dict[str, Any] = {}


class ProviderRejected(Exception):
    """The provider refused the send; `code` is the provider's error code (Twilio's, e.g. 21211)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


OUTCOME_UNKNOWN = "provider_outcome_unknown"  # the code of a send whose outcome the provider could not confirm
# A message whose send failed unexpectedly (not a refusal), which the provider says it never took.
SEND_FAILED = ProviderRejected("parley_send_failed", "the send failed unexpectedly before the provider answered")


class SendOutcomeUnknown(ProviderRejected):
    """The provider could not confirm whether it took the message (it stayed unreachable after a
    request that may have arrived). The send is recorded as failed and never resent automatically:
    a duplicate SMS cannot be taken back. A late status callback for it is still kept for audit."""


class ProviderUnavailable(Exception):
    """The provider could not be asked (network failure, 5xx, unreadable answer): an expected, passing
    failure, logged as one line by whoever retries."""


# Reports handed over together are applied in one transaction, in order.
StatusSink = Callable[[Sequence[StatusReport]], Awaitable[None]]


class Provider(Protocol):
    name: str
    # True when the provider answers STOP/START keywords itself, so Parley must not confirm again.
    confirms_opt_out: bool

    async def start(self, on_status: StatusSink) -> None: ...

    async def close(self) -> None: ...

    async def send(self, request: SendRequest) -> SendAccepted:
        """Hand one SMS to the provider; raise ProviderRejected when it refuses."""
        ...

    async def fetch_status(self, message: Message) -> StatusReport | None:
        """Ask the provider for a message's current status (None when it cannot say)."""
        ...

    async def find_sent(self, message: Message, taken: Collection[str] = ()) -> SendAccepted | None:
        """After a crash during a send whose answer was lost: the provider's acceptance of `message`, or None
        when it certainly did not take it; raise when it cannot be asked. `taken`: provider ids already recorded
        for other messages, which cannot be this one's (an identical text sent to the pair before)."""
        ...
