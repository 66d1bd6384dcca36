-- Every outbound message is filed under a conversation with the same toNumber, so the simulator's
-- "messages a number received" can be found through the conversations to that number. The pair
-- index leads with to_number to serve that (pair look-ups give both numbers, so they are served the
-- same), and messages_to_number goes: it cost every outbound message an insert at a random place.
DROP INDEX messages_to_number;
DROP INDEX conversations_pair;
CREATE INDEX conversations_pair ON conversations (to_number, from_number, created_at);
