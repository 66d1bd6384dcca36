-- The media an inbound MMS carried (Twilio's `MediaUrlN`/`MediaContentTypeN`), as a JSON array of
-- {"url", "contentType"}; NULL for a message without any. They were dropped, and a picture sent without text
-- reached the model as an empty message.
ALTER TABLE messages ADD COLUMN media TEXT;
