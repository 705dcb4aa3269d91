"""The Orders service's actors: `dramatiq actors.orders` runs them."""

from actors.broker import declare
from services.orders.handlers import make_handler
from services.orders.recovery import rerequest_unanswered

actors = declare("orders", make_handler, recover=rerequest_unanswered)
relay_orders_outbox = actors.relay_outbox
apply_orders_inbox = actors.apply_inbox
sweep_orders = actors.sweep
