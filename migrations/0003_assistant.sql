-- The assistant loop: every tool call the model made, in the order it made them.
-- A tool call belongs to one model answer (turn_id, round) and is replayed into later turns' history
-- right after the message with seq = after_seq (the last message the model had seen).

CREATE TABLE tool_calls (
    pos                INTEGER PRIMARY KEY,
    id                 TEXT NOT NULL UNIQUE,
    conversation_id    TEXT NOT NULL REFERENCES conversations(id),
    org_id             TEXT NOT NULL REFERENCES orgs(id),
    turn_id            TEXT NOT NULL,
    round              INTEGER NOT NULL,
    position           INTEGER NOT NULL,
    call_id            TEXT NOT NULL,
    after_seq          INTEGER NOT NULL,
    assistant_content  TEXT,
    name               TEXT NOT NULL,
    kind               TEXT NOT NULL CHECK (kind IN ('webhook', 'end_conversation', 'handoff_to_human', 'unknown')),
    arguments          TEXT NOT NULL,
    result             TEXT,
    is_error           INTEGER,
    duration_ms        INTEGER,
    created_at         INTEGER NOT NULL,
    completed_at       INTEGER
);
CREATE INDEX tool_calls_conversation ON tool_calls (conversation_id, pos);

-- One row per assistant turn that reached its reply: the last message seq it had seen (after_seq) and the
-- SMS it sent. A customer message newer than every turn's after_seq is what the next turn answers, and a
-- reply is replayed into history right after the messages its turn had seen: texts that arrive while a
-- turn runs get lower seqs than its reply, so the seq order alone would misplace them.
CREATE TABLE assistant_turns (
    id                TEXT PRIMARY KEY,
    conversation_id   TEXT NOT NULL REFERENCES conversations(id),
    after_seq         INTEGER NOT NULL,
    reply_message_id  TEXT,
    created_at        INTEGER NOT NULL
);
CREATE INDEX assistant_turns_conversation ON assistant_turns (conversation_id, after_seq);
