"""The Orders service's actors: `dramatiq actors.orders` runs them."""

from actors.broker import Chore, config, declare
from services.orders.handlers import make_handler
from services.orders.recovery import forget_settled, rerequest_unanswered

# Orders left new are asked for again, and forgotten once settled (services/orders/recovery.py).
chores = [
    Chore("rerequest", config.payment_rerequest_interval, rerequest_unanswered),
    Chore("forget-rerequests", config.purge_interval, forget_settled),
]
actors = declare("orders", make_handler, chores=chores)
relay_orders_outbox = actors.relay_outbox
apply_orders_inbox = actors.apply_inbox
sweep_orders = actors.sweep
