-- Flash sales (秒杀) for live streams: events, their items (quota set aside from SKU stock), the
-- order of every accepted reservation, and units given back to an event's quota.

create table flash_sales (
    id                    bigint generated always as identity primary key,
    name                  text not null check (length(name) between 1 and 64),
    -- The live stream (room id, channel) the event belongs to; free text for the merchant.
    live_stream           text not null default '' check (length(live_stream) <= 128),
    starts_at             timestamptz not null,
    ends_at               timestamptz not null,
    pay_deadline_minutes  integer not null default 5 check (pay_deadline_minutes between 1 and 1440),
    -- Purchase attempts per second, per shopper and per client IP (anti-scalper, enforced in Redis).
    user_rate_limit       integer not null default 5 check (user_rate_limit between 1 and 100000),
    ip_rate_limit         integer not null default 200 check (ip_rate_limit between 1 and 10000000),
    -- draft: editable, no stock set aside; published: quota taken from SKU stock, Redis warm;
    -- stopped: ended early by the merchant; settled: unsold units went back to SKU stock (once).
    status                text not null default 'draft'
                          check (status in ('draft', 'published', 'stopped', 'settled')),
    published_at          timestamptz,
    stopped_at            timestamptz,
    settled_at            timestamptz,
    created_at            timestamptz not null default now(),
    updated_at            timestamptz not null default now(),
    check (ends_at > starts_at)
);
create index flash_sales_live_idx on flash_sales (ends_at) where status in ('published', 'stopped');

create table flash_sale_items (
    id               bigint generated always as identity primary key,
    flash_sale_id    bigint not null references flash_sales (id),
    sku_id           bigint not null references skus (id),
    flash_price      integer not null check (flash_price >= 1),
    -- Units set aside for the event (taken out of skus.stock while published).
    quota            integer not null check (quota >= 0),
    -- Units in orders that were not given back: quota - sold is what Redis may still sell.
    sold             integer not null default 0 check (sold >= 0),
    per_user_limit   integer not null default 1 check (per_user_limit between 1 and 999),
    -- Written once, at settlement: the unsold units that went back to SKU stock.
    returned_to_stock integer,
    created_at       timestamptz not null default now(),
    check (sold <= quota),
    unique (flash_sale_id, sku_id)
);
create index flash_sale_items_sale_idx on flash_sale_items (flash_sale_id, id);

-- One row per accepted reservation: the reservation id (from the Lua script's stream entry) is
-- unique, so the API and the worker persisting the same reservation create one order.
create table flash_sale_orders (
    reservation_id   text primary key,
    -- The order's id is drawn first and its row inserted by the next statement of the same
    -- transaction (one multi-row INSERT per batch of winners), hence the deferred check.
    order_id         bigint not null unique references orders (id) deferrable initially deferred,
    flash_sale_id    bigint not null references flash_sales (id),
    item_id          bigint not null references flash_sale_items (id),
    user_id          bigint not null references users (id),
    qty              integer not null check (qty > 0),
    reserved_at      timestamptz not null,
    created_at       timestamptz not null default now()
);
create index flash_sale_orders_item_user_idx on flash_sale_orders (item_id, user_id);
create index flash_sale_orders_sale_idx on flash_sale_orders (flash_sale_id);

-- Units of a flash-sale order given back to the event's quota (timeout, cancel, refund). The row
-- is written in the transaction of the guarded state change; `redis_done` marks that Redis got
-- them back too (the return id makes that step idempotent).
create table flash_sale_returns (
    id               bigint generated always as identity primary key,
    order_id         bigint not null references orders (id),
    flash_sale_id    bigint not null references flash_sales (id),
    item_id          bigint not null references flash_sale_items (id),
    user_id          bigint not null,
    qty              integer not null check (qty > 0),
    redis_done       boolean not null default false,
    created_at       timestamptz not null default now()
);
create index flash_sale_returns_pending_idx on flash_sale_returns (id) where not redis_done;
create index flash_sale_returns_item_user_idx on flash_sale_returns (item_id, user_id);
