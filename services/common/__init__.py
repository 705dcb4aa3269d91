"""Plumbing shared by every service: configuration, database, outbox/inbox, Kafka, HTTP."""
