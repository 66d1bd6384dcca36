-- An endpoint's delivery log is listed newest first (`ORDER BY rowid DESC`). The only index leading with
-- `webhook_id` was the (webhook_id, event_id) key, so every page read all of the endpoint's deliveries and
-- sorted them: an index on `webhook_id` alone holds them in rowid order, and a page walks it backwards
-- from the cursor.
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (webhook_id);
