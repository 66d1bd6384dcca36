-- Keys still held by their create (`running`), by conversation: start-up recovery finds the creates a stop or
-- crash cut off through them (a conversation closed while its opening was on its way is no longer `pending`),
-- and settling or freeing a key by its conversation no longer scans every key of the last 24 hours.
CREATE INDEX idempotency_running ON idempotency_keys (conversation_id) WHERE state = 'running';
