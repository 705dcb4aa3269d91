"""The Payments service: accounts, their append-only ledger, and exactly-once charging of orders."""
