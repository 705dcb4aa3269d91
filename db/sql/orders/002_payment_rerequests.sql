-- Orders whose payment was requested again. An order is answered once its request reaches
-- Payments and the answer reaches Orders; a request or an answer lost on the way (Kafka data
-- lost, a message dead-lettered and its cause since mended) would leave it new for good. The
-- Orders sweeper asks again for an order left new PAYMENT_REREQUEST_AFTER seconds after its
-- request was published, then after twice as long each time (services/orders/recovery.py);
-- Payments answers a repeated order as it answered it first, so asking again never charges
-- twice. One row per order asked again, forgotten once the order is settled and the row is
-- RETENTION_HOURS old.
CREATE TABLE payment_rerequests (
    order_id           uuid        PRIMARY KEY,
    attempts           int         NOT NULL CHECK (attempts > 0),
    last_requested_at  timestamptz NOT NULL,
    next_request_at    timestamptz NOT NULL
);
