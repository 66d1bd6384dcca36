-- A webhook kept one previous secret: a second rotation within 24 h overwrote it, so a receiver still on the
-- secret before that stopped verifying. Every secret rotated away now keeps signing until 24 h after its own
-- rotation: `previous_secrets` is a JSON array of {"secret", "until"}, newest first, at most 10 entries.
-- The old pair is copied in (an expired entry is harmless: it never signs, and the next rotation drops it)
-- and then dropped, so the array is the only record of rotation state.
ALTER TABLE webhooks ADD COLUMN previous_secrets TEXT NOT NULL DEFAULT '[]';
UPDATE webhooks SET previous_secrets = json_array(json_object('secret', previous_secret, 'until', previous_secret_until))
    WHERE previous_secret IS NOT NULL AND previous_secret_until IS NOT NULL;
ALTER TABLE webhooks DROP COLUMN previous_secret;
ALTER TABLE webhooks DROP COLUMN previous_secret_until;
