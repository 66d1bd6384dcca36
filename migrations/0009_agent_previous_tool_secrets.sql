-- An agent kept one previous tool secret: a second rotation within 24 h overwrote it, so a tool server still
-- on the secret before that started rejecting the assistant's calls. As for webhooks (0008), every tool secret
-- rotated away now keeps signing until 24 h after its own rotation: `previous_tool_secrets` is a JSON array of
-- {"secret", "until"}, newest first, at most 10 entries. The old pair is copied in (an expired entry is
-- harmless: it never signs, and the next rotation drops it) and then dropped.
ALTER TABLE agents ADD COLUMN previous_tool_secrets TEXT NOT NULL DEFAULT '[]';
UPDATE agents
    SET previous_tool_secrets = json_array(json_object('secret', previous_tool_secret, 'until', previous_tool_secret_until))
    WHERE previous_tool_secret IS NOT NULL AND previous_tool_secret_until IS NOT NULL;
ALTER TABLE agents DROP COLUMN previous_tool_secret;
ALTER TABLE agents DROP COLUMN previous_tool_secret_until;
