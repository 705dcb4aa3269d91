"""The Orders service's actors: `dramatiq actors.orders` runs them."""

from actors.broker import Chore, config, declare
from services.orders.handlers import make_handler
from services.orders.recovery import rerequest_unanswered

# Orders left new are asked for again (services/orders/recovery.py).
rerequest = Chore("rerequest", config.payment_rerequest_interval, rerequest_unanswered)
actors = declare("orders", make_handler, chores=[rerequest])
relay_orders_outbox = actors.relay_outbox
apply_orders_inbox = actors.apply_inbox
sweep_orders = actors.sweep
