-- Coupons: templates (what a coupon is worth and who may have it), coupons (one row per unit a
-- shopper holds), merchant grant batches, and the order's coupon.

create table coupon_templates (
    id               bigint generated always as identity primary key,
    name             text not null check (length(name) between 1 and 64),
    description      text not null default '' check (length(description) <= 500),
    -- threshold: spend >= threshold, get amount off (满减); percent: percent_off % off the eligible
    -- lines, capped at max_discount (折扣); no_threshold: amount off anything (无门槛).
    kind             text not null check (kind in ('threshold', 'percent', 'no_threshold')),
    threshold        integer not null default 0 check (threshold >= 0),
    amount           integer check (amount > 0),
    percent_off      smallint check (percent_off between 1 and 99),
    max_discount     integer check (max_discount > 0),
    -- all: whole store; categories / products: only those (a top category covers its children);
    -- exclude_products: everything but those.
    scope            text not null default 'all'
                     check (scope in ('all', 'categories', 'products', 'exclude_products')),
    scope_ids        bigint[] not null default '{}',
    -- Public claims only (grants are budgeted by whoever grants); null = unlimited.
    total_quantity   integer check (total_quantity > 0),
    per_user_limit   integer not null default 1 check (per_user_limit between 1 and 1000),
    -- Shoppers may claim it (coupon centre); false: only granted (merchant, newcomer, games).
    is_public        boolean not null default true,
    -- Granted automatically to every new shopper on first login while active.
    for_newcomers    boolean not null default false,
    claim_starts_at  timestamptz,
    claim_ends_at    timestamptz,
    -- fixed: valid_from..valid_until; relative: valid_days from the moment it is received.
    validity         text not null check (validity in ('fixed', 'relative')),
    valid_from       timestamptz,
    valid_until      timestamptz,
    valid_days       integer check (valid_days between 1 and 3650),
    status           text not null default 'draft' check (status in ('draft', 'active', 'paused', 'ended')),
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    check (kind = 'percent' or amount is not null),
    check (kind <> 'percent' or percent_off is not null),
    check (kind <> 'no_threshold' or threshold = 0),
    check (scope = 'all' or cardinality(scope_ids) > 0),
    check (claim_starts_at is null or claim_ends_at is null or claim_starts_at < claim_ends_at),
    check (validity <> 'fixed' or (valid_from is not null and valid_until is not null and valid_from < valid_until)),
    check (validity <> 'relative' or valid_days is not null)
);
create index coupon_templates_status_idx on coupon_templates (status, id desc);

create table coupons (
    id               bigint generated always as identity primary key,
    -- The reservation id of the claim (or a generated code for grants): what makes a replayed
    -- or re-persisted reservation a no-op.
    code             text not null unique,
    template_id      bigint not null references coupon_templates (id),
    user_id          bigint not null references users (id),
    source           text not null check (source in ('claim', 'grant', 'newcomer', 'game', 'channel')),
    -- Grant batch / prize / channel reference: one coupon per (source, source_ref, user).
    source_ref       text,
    -- Stored state; "expired" and "used" are also derived at read time (valid_until passed, or
    -- the locking order was paid) until the worker or the order-event handler writes them.
    status           text not null default 'available'
                     check (status in ('available', 'locked', 'used', 'expired')),
    valid_from       timestamptz not null,
    valid_until      timestamptz not null,
    locked_order_id  bigint references orders (id),
    used_order_id    bigint references orders (id),
    claimed_at       timestamptz not null default now(),
    locked_at        timestamptz,
    used_at          timestamptz,
    expired_at       timestamptz,
    check (valid_from < valid_until),
    check (status <> 'locked' or locked_order_id is not null),
    check (status <> 'used' or used_order_id is not null)
);
create index coupons_user_idx on coupons (user_id, id desc);
create index coupons_template_idx on coupons (template_id, source, user_id);
create index coupons_expiring_idx on coupons (valid_until) where status = 'available';
-- One coupon per order, and one coupon per grant reference and shopper.
create unique index coupons_locked_order_idx on coupons (locked_order_id) where locked_order_id is not null;
create unique index coupons_source_ref_idx on coupons (source, source_ref, user_id) where source_ref is not null;

alter table orders add column coupon_id bigint references coupons (id);
create index orders_coupon_idx on orders (coupon_id) where coupon_id is not null;
