"""Orders & Payments: the HTTP services (gateway, orders, payments) and their shared plumbing."""
