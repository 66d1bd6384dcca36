-- What an assistant turn cut off by a stop or crash leaves behind, kept where start-up and the re-run turn
-- find it:
-- * `end_requested_at`: the model called `end_conversation`; the conversation closes once that turn's reply
--   is sent. It lived only in the running turn, so a turn cut off after the call left the conversation open.
-- * running tool calls (no `completed_at`), which start-up completes as interrupted: a small index of just
--   those, instead of a scan of every tool call ever made.
ALTER TABLE conversations ADD COLUMN end_requested_at INTEGER;
CREATE INDEX tool_calls_running ON tool_calls (pos) WHERE completed_at IS NULL;
