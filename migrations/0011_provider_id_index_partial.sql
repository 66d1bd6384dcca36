-- A message has no provider id until a provider takes it (every outbound message is inserted without one),
-- and only rows with one are ever looked up by it (`provider_message_id = ?`). The index kept an entry for
-- every such NULL, inserted with the message and deleted again when the provider's id was set: now only
-- messages with an id are in it.
DROP INDEX messages_provider_id;
CREATE INDEX messages_provider_id ON messages (provider_message_id) WHERE provider_message_id IS NOT NULL;
