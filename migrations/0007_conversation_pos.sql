-- A conversation's messages and events were indexed under its id, a UUIDv4: every new conversation's
-- rows went to a random place in both indexes, and every group commit wrote one more page for each.
-- Conversations now also get `pos`, an integer that grows with each new one, and their messages and
-- events carry it: a new conversation's rows append to those indexes. The public ids do not change.
ALTER TABLE conversations ADD COLUMN pos INTEGER;
UPDATE conversations SET pos = rowid;
CREATE UNIQUE INDEX conversations_pos ON conversations (pos);

ALTER TABLE messages ADD COLUMN conversation_pos INTEGER;
UPDATE messages SET conversation_pos = (SELECT c.pos FROM conversations c WHERE c.id = messages.conversation_id)
    WHERE conversation_id IS NOT NULL;
DROP INDEX messages_conversation_seq;
CREATE UNIQUE INDEX messages_conversation_seq ON messages (conversation_pos, seq);

ALTER TABLE events ADD COLUMN conversation_pos INTEGER;
UPDATE events SET conversation_pos = (SELECT c.pos FROM conversations c WHERE c.id = events.conversation_id)
    WHERE conversation_id IS NOT NULL;
DROP INDEX events_conversation;
CREATE INDEX events_conversation ON events (conversation_pos, pos);
