-- Orders, their lines, shipments, payments, refunds, the order-events outbox, and idempotency keys.

-- The store's shipping rule: one row (id = 1). Flat fee, free at or above a threshold of goods value.
create table shipping_rule (
    id              smallint primary key default 1 check (id = 1),
    flat_fee        integer not null default 800 check (flat_fee >= 0),
    free_threshold  integer default 9900 check (free_threshold is null or free_threshold >= 0),
    updated_at      timestamptz not null default now()
);
insert into shipping_rule (id) values (1);

-- Replayable responses of mutating calls. A request takes a transaction-scoped advisory lock on
-- its key first, so a concurrent duplicate waits for the first and then replays its response.
create table idempotency_keys (
    user_id         bigint not null,
    scope           text not null,
    key             text not null check (length(key) between 1 and 128),
    request_hash    bytea not null,
    response_status smallint not null,
    -- The exact bytes of the first response, so a replay is byte-for-byte identical.
    response_body   bytea not null,
    created_at      timestamptz not null default now(),
    primary key (user_id, scope, key)
);
create index idempotency_keys_created_idx on idempotency_keys (created_at);

-- Feeds the tail of order, payment and refund numbers: unique without a retry loop.
create sequence business_no_seq;

create table orders (
    id                bigint generated always as identity primary key,
    order_no          text not null unique,
    user_id           bigint not null references users (id),
    kind              text not null default 'normal'
                      check (kind in ('normal', 'flash_sale', 'group_buy', 'bargain', 'prize')),
    activity_id       bigint,
    status            text not null default 'pending_payment'
                      check (status in ('pending_payment', 'paid', 'shipped', 'completed',
                                        'cancelled', 'refunding', 'refunded')),
    items_amount      integer not null check (items_amount >= 0),
    discount_amount   integer not null default 0 check (discount_amount >= 0),
    shipping_fee      integer not null default 0 check (shipping_fee >= 0),
    payable_amount    integer not null check (payable_amount >= 0),
    paid_amount       integer not null default 0 check (paid_amount >= 0),
    refunded_amount   integer not null default 0 check (refunded_amount >= 0),
    address           jsonb,
    remark            text not null default '' check (length(remark) <= 200),
    pay_deadline      timestamptz,
    paid_at           timestamptz,
    shipped_at        timestamptz,
    auto_confirm_at   timestamptz,
    completed_at      timestamptz,
    cancelled_at      timestamptz,
    cancel_reason     text,
    payment_provider  text,
    -- The payment that paid this order (refunds go back through it).
    paid_payment_id   bigint,
    -- The status a full refund started from, so a rejected refund can put the order back.
    refund_from_status text,
    created_at        timestamptz not null default now(),
    updated_at        timestamptz not null default now(),
    check (refunded_amount <= paid_amount),
    -- Payable is never below 1 fen, except a free prize.
    check (payable_amount >= 1 or kind = 'prize'),
    check (items_amount - discount_amount + shipping_fee = payable_amount)
);
create index orders_user_idx on orders (user_id, id desc);
create index orders_status_idx on orders (status, id desc);
create index orders_pay_deadline_idx on orders (pay_deadline) where status = 'pending_payment';
create index orders_auto_confirm_idx on orders (auto_confirm_at) where status = 'shipped';
create index orders_activity_idx on orders (kind, activity_id) where activity_id is not null;

create table order_lines (
    id               bigint generated always as identity primary key,
    order_id         bigint not null references orders (id),
    sku_id           bigint not null references skus (id),
    product_id       bigint not null,
    title            text not null,
    specs            jsonb not null default '{}',
    image_url        text not null default '',
    unit_price       integer not null check (unit_price >= 0),
    qty              integer not null check (qty > 0),
    line_amount      integer not null check (line_amount >= 0),
    discount_amount  integer not null default 0 check (discount_amount >= 0),
    -- What the shopper pays for this line (line_amount - discount_amount): the refund ceiling.
    payable_amount   integer not null check (payable_amount >= 0),
    refunded_qty     integer not null default 0 check (refunded_qty >= 0),
    refunded_amount  integer not null default 0 check (refunded_amount >= 0),
    check (line_amount = unit_price * qty),
    check (payable_amount = line_amount - discount_amount),
    check (refunded_qty <= qty),
    check (refunded_amount <= payable_amount)
);
create index order_lines_order_idx on order_lines (order_id);

create table shipments (
    id            bigint generated always as identity primary key,
    order_id      bigint not null references orders (id),
    carrier       text not null check (length(carrier) between 1 and 64),
    tracking_no   text not null check (length(tracking_no) between 1 and 64),
    line_ids      bigint[] not null default '{}',
    created_at    timestamptz not null default now(),
    unique (carrier, tracking_no)
);
create index shipments_order_idx on shipments (order_id);

-- One row per payment attempt; the provider's transaction id is unique, so a replayed
-- notification can never mark a second payment.
create table payments (
    id               bigint generated always as identity primary key,
    order_id         bigint not null references orders (id),
    provider         text not null check (provider in ('wechatpay', 'sandbox')),
    out_trade_no     text not null unique,
    amount           integer not null check (amount > 0),
    status           text not null default 'open' check (status in ('open', 'paid', 'closed')),
    expires_at       timestamptz not null,
    payer_openid     text,
    prepay_id        text,
    transaction_id   text,
    paid_at          timestamptz,
    closed_at        timestamptz,
    close_synced     boolean not null default false,
    notify           jsonb,
    created_at       timestamptz not null default now(),
    unique (provider, transaction_id)
);
create index payments_order_idx on payments (order_id);
create index payments_close_idx on payments (id) where status = 'closed' and not close_synced;

create table refunds (
    id                  bigint generated always as identity primary key,
    refund_no           text not null unique,
    order_id            bigint not null references orders (id),
    user_id             bigint not null references users (id),
    payment_id          bigint references payments (id),
    -- requested -> approved -> processing -> succeeded; or rejected. 'auto' marks system refunds.
    status              text not null default 'requested'
                        check (status in ('requested', 'approved', 'rejected', 'processing', 'succeeded')),
    origin              text not null default 'shopper' check (origin in ('shopper', 'merchant', 'system')),
    reason              text not null default '' check (length(reason) <= 200),
    amount              integer not null check (amount > 0),
    restock             boolean,
    reject_reason       text,
    provider_refund_id  text,
    attempts            integer not null default 0,
    next_attempt_at     timestamptz,
    last_error          text,
    created_at          timestamptz not null default now(),
    decided_at          timestamptz,
    succeeded_at        timestamptz
);
create index refunds_order_idx on refunds (order_id);
create index refunds_due_idx on refunds (next_attempt_at) where status in ('approved', 'processing');

create table refund_lines (
    refund_id      bigint not null references refunds (id),
    order_line_id  bigint not null references order_lines (id),
    qty            integer not null check (qty >= 0),
    amount         integer not null check (amount >= 0),
    primary key (refund_id, order_line_id)
);

-- The outbox: written in the same transaction as the state change it describes.
create table order_events (
    id             bigint generated always as identity primary key,
    order_id       bigint not null references orders (id),
    type           text not null,
    payload        jsonb not null default '{}',
    created_at     timestamptz not null default now(),
    dispatched_at  timestamptz,
    attempts       integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error     text
);
create index order_events_pending_idx on order_events (next_attempt_at, id) where dispatched_at is null;
create index order_events_order_idx on order_events (order_id, id);

-- Per-handler idempotency: a handler's effect and this row commit together.
create table order_event_deliveries (
    event_id      bigint not null references order_events (id),
    handler       text not null,
    delivered_at  timestamptz not null default now(),
    primary key (event_id, handler)
);
