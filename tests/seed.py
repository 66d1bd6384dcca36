"""The create body of the public API page (shared by the tests and the benchmarks)."""

SEED_CREATE = {
    "agentSlug": "recall-sms",
    "toNumber": "+15555550199",
    "fromNumber": "+15555550123",
    "welcomeMessage": "Hi Ada, this is PAM Motors following up on your service recall.",
    "dynamicVariables": {"customerName": "Ada", "dealershipName": "PAM Motors", "recallId": "24V-123"},
}
