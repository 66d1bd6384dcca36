-- 1 for a turn whose reply was dropped because a person (an operator's message) answered the texts it had read. Such
-- a turn still counts as over (its hand-off is not run again, its tool rounds are not carried on), but it answered
-- nothing itself: should the person's message turn out not to reach the phone, those texts are the assistant's
-- again.
ALTER TABLE assistant_turns ADD COLUMN dropped INTEGER NOT NULL DEFAULT 0;
