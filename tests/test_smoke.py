from tests.conftest import Harness
from tests.seed import SEED_CREATE


async def test_seed_create_request_answers_201_with_the_exact_envelope(harness: Harness) -> None:
    response = await harness.post("/v1/sms-conversations", SEED_CREATE)
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"data", "meta"}
    assert set(body["data"]) == {"conversationId", "providerMessageId", "status"}
    assert body["data"]["status"] == "in_progress"
    assert body["data"]["providerMessageId"].startswith("SM")
    assert body["meta"] == {"request_id": response.headers["x-request-id"]}
