-- A sender number's claim becomes permanent with its owner's first send the provider took (`sent_at`).
-- Before, a create the provider refused, or a custom agent's `phoneNumber`, kept a number for its organization for
-- good, even after the agent was deleted: another organization could hold a number it never sent from.
ALTER TABLE sender_numbers ADD COLUMN sent_at INTEGER;

-- Every owner that has a conversation from the number whose opening may have gone out has sent from it: any
-- but a failed opening, and a failed opening too when the provider took it (it has the provider's id) or could
-- not say (`provider_outcome_unknown`). An interrupted create still `pending` may have: kept. One pass over
-- conversations.
UPDATE sender_numbers SET sent_at = created_at
WHERE (number, org_id) IN (
    SELECT c.from_number, c.org_id FROM conversations c
    WHERE NOT (c.status = 'closed' AND c.end_reason = 'opening_message_failed')
       OR EXISTS (
           SELECT 1 FROM messages m
           WHERE m.conversation_pos = c.pos AND m.seq = 1
             AND (m.provider_message_id IS NOT NULL OR m.error_code = 'provider_outcome_unknown')
       )
);

-- The rest is given back unless a live custom agent of the owner has the number.
DELETE FROM sender_numbers
WHERE sent_at IS NULL
  AND NOT EXISTS (
      SELECT 1 FROM agents a
      WHERE a.org_id = sender_numbers.org_id AND a.kind = 'custom' AND a.deleted_at IS NULL
        AND json_extract(a.config, '$.phoneNumber') = sender_numbers.number
  );
