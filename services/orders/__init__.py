"""The Orders service: orders, their payment requests (outbox) and their settled status."""
