-- A sender number belongs to the organization that first sends from it. Before, two organizations could
-- send from one number: the second one's create superseded (closed) the first one's conversation on the
-- pair, and the customer's replies, STOP included, went to whichever organization texted last.
CREATE TABLE sender_numbers (
    number      TEXT PRIMARY KEY,
    org_id      TEXT NOT NULL REFERENCES orgs (id),
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;

-- A number only one organization has sent from (or set as a custom agent's number) is that organization's.
-- A number several have used stays unowned: whichever sends from it next takes it.
INSERT INTO sender_numbers (number, org_id, created_at)
SELECT number, MIN(org_id), MIN(created_at) FROM (
    SELECT from_number AS number, org_id, created_at FROM conversations
    UNION ALL
    SELECT json_extract(config, '$.phoneNumber'), org_id, created_at FROM agents
    WHERE kind = 'custom' AND deleted_at IS NULL AND json_extract(config, '$.phoneNumber') IS NOT NULL
)
GROUP BY number
HAVING COUNT(DISTINCT org_id) = 1;
