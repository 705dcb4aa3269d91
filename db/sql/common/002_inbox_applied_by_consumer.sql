-- The consumers now apply what they record in the same transaction, so a NOTIFY per inbox
-- insert would only wake an actor with nothing to do. Failed events are retried by the sweeper.
DROP TRIGGER IF EXISTS inbox_notify ON inbox;
DROP FUNCTION IF EXISTS notify_inbox();
