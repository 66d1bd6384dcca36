-- The compliance keyword an inbound message was acted on as (`opt_out`, `opt_in`, `help`), NULL for any other
-- message. Most keywords can be read again from the body, but one a provider recognised itself (Twilio's
-- `OptOutType` on a Messaging Service keyword such as `AIDE`) cannot: without it, a later assistant turn would
-- hand that HELP to the model as an ordinary text.
ALTER TABLE messages ADD COLUMN keyword TEXT;
