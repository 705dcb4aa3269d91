"""The Payments service's actors: `dramatiq actors.payments` runs them."""

from actors.broker import declare
from services.payments.handlers import make_handler

actors = declare("payments", make_handler)
relay_payments_outbox = actors.relay_outbox
apply_payments_inbox = actors.apply_inbox
sweep_payments = actors.sweep
