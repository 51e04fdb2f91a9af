-- Points (an append-only ledger with a per-shopper balance) and marketing games (wheel, scratch
-- card, egg smash) on one draw engine: games, prizes, draws, extra chances and the prize outbox.

create table points_accounts (
    user_id     bigint primary key references users (id),
    -- Spending is a conditional UPDATE on this row, so the balance can never go below zero.
    balance     bigint not null default 0 check (balance >= 0),
    -- Points a refund took back after they were spent: later earnings repay this first.
    debt        bigint not null default 0 check (debt >= 0),
    updated_at  timestamptz not null default now()
);

create table points_entries (
    id             bigint generated always as identity primary key,
    user_id        bigint not null references users (id),
    kind           text not null check (kind in ('prize', 'order', 'draw', 'draw_refund', 'refund_reversal', 'adjust')),
    -- What the entry is for (a draw, an order, a refund): one entry per (kind, ref).
    ref            text not null,
    amount         bigint not null check (amount <> 0),  -- nominal change: + earned, - spent or reversed
    balance_delta  bigint not null,
    debt_delta     bigint not null,
    balance_after  bigint not null check (balance_after >= 0),
    created_at     timestamptz not null default now(),
    unique (kind, ref)
);
create index points_entries_user_idx on points_entries (user_id, id desc);

-- Points earned per yuan paid, on order completion (one row, merchant-editable).
create table points_rule (
    id              smallint primary key default 1 check (id = 1),
    points_per_yuan integer not null default 1 check (points_per_yuan between 0 and 1000)
);
insert into points_rule (id) values (1);

create table games (
    id                   bigint generated always as identity primary key,
    type                 text not null check (type in ('wheel', 'scratch', 'egg')),
    name                 text not null check (length(name) between 1 and 64),
    status               text not null default 'draft' check (status in ('draft', 'active', 'paused', 'ended')),
    starts_at            timestamptz not null,
    ends_at              timestamptz not null,
    free_per_day         integer not null default 1 check (free_per_day >= 0),
    total_per_user       integer check (total_per_user > 0),  -- null: no lifetime cap
    cost_points          integer check (cost_points > 0),     -- null: no paid draws
    -- Extra chances: per paid order, per invited shopper who logs in (a merchant task), capped per day.
    chances_per_paid_order integer not null default 0 check (chances_per_paid_order >= 0),
    chances_per_invite   integer not null default 0 check (chances_per_invite >= 0),
    extra_per_day_cap    integer not null default 0 check (extra_per_day_cap >= 0),
    out_of_stock         text not null default 'thanks' check (out_of_stock in ('thanks', 'redistribute')),
    pity_after           integer check (pity_after > 0),
    pity_position        smallint,
    egg_count            smallint not null default 9 check (egg_count between 2 and 30),
    card_ttl_minutes     integer not null default 1440 check (card_ttl_minutes > 0),
    claim_days           integer not null default 7 check (claim_days > 0),
    -- Bumped on every edit of the prize list: a draw records the version its weights came from.
    weights_version      integer not null default 1,
    created_at           timestamptz not null default now(),
    updated_at           timestamptz not null default now(),
    check (starts_at < ends_at),
    check ((pity_after is null) = (pity_position is null))
);

create table game_prizes (
    id                  bigint generated always as identity primary key,
    game_id             bigint not null references games (id) on delete cascade,
    position            smallint not null check (position >= 0),
    name                text not null check (length(name) between 1 and 64),
    kind                text not null check (kind in ('coupon', 'points', 'goods', 'thanks')),
    coupon_template_id  bigint references coupon_templates (id),
    points              integer check (points > 0),
    sku_id              bigint references skus (id),
    weight              integer not null check (weight > 0),
    stock               integer check (stock >= 0),   -- units ever issuable; null: unlimited
    per_user_cap        integer check (per_user_cap > 0),
    unique (game_id, position),
    check (kind <> 'coupon' or coupon_template_id is not null),
    check (kind <> 'points' or points is not null),
    check (kind <> 'goods' or sku_id is not null)
);

create table game_draws (
    id               bigint generated always as identity primary key,
    draw_no          text not null unique,           -- the reservation id
    game_id          bigint not null references games (id),
    user_id          bigint not null references users (id),
    prize_id         bigint not null references game_prizes (id),
    position         smallint not null,
    rand             bigint not null,                -- the random value the script used (replayable)
    weights_version  integer not null,
    business_date    date not null,
    paid             boolean not null,
    cost_points      integer not null default 0,
    pity             boolean not null default false,
    -- Scratch cards: the result is sealed at issue and revealed later (null for wheel and egg).
    card_status      text check (card_status in ('sealed', 'revealed', 'expired')),
    expires_at       timestamptz,
    revealed_at      timestamptz,
    -- The unit went back to the prize stock (expired card, unclaimed goods): once, guarded.
    returned         boolean not null default false,
    drawn_at         timestamptz not null,
    -- The points debit a paid draw was made on (unique: one draw per payment).
    debit_ref        text unique,
    created_at       timestamptz not null default now()
);
create index game_draws_user_idx on game_draws (user_id, id desc);
create index game_draws_game_idx on game_draws (game_id, user_id, business_date);
create index game_draws_sealed_idx on game_draws (expires_at) where card_status = 'sealed';

-- Extra chances (order paid, invitations, merchant tasks): one row per grant reference, capped
-- per day; a reference that found the day's cap used up is recorded with amount 0 (handled).
create table game_chance_grants (
    id             bigint generated always as identity primary key,
    game_id        bigint not null references games (id),
    user_id        bigint not null references users (id),
    business_date  date not null,
    amount         integer not null check (amount >= 0),
    source         text not null check (source in ('order.paid', 'invite', 'task')),
    ref            text not null,
    created_at     timestamptz not null default now(),
    unique (game_id, user_id, source, ref)
);
create index game_chance_grants_day_idx on game_chance_grants (game_id, user_id, business_date);

-- The prize outbox: one row per winning draw, delivered exactly once by the worker.
create table prize_deliveries (
    id               bigint generated always as identity primary key,
    draw_id          bigint not null unique references game_draws (id),
    user_id          bigint not null references users (id),
    game_id          bigint not null references games (id),
    prize_id         bigint not null references game_prizes (id),
    kind             text not null check (kind in ('coupon', 'points', 'goods')),
    -- pending -> delivered (coupon, points); pending -> awaiting_claim -> claimed | expired (goods)
    status           text not null default 'pending'
                     check (status in ('pending', 'delivered', 'awaiting_claim', 'claimed', 'expired')),
    attempts         integer not null default 0,
    last_error       text,
    next_attempt_at  timestamptz not null default now(),
    coupon_id        bigint references coupons (id),
    order_id         bigint references orders (id),
    claim_deadline   timestamptz,
    delivered_at     timestamptz,
    created_at       timestamptz not null default now()
);
create index prize_deliveries_due_idx on prize_deliveries (next_attempt_at) where status = 'pending';
create index prize_deliveries_claim_idx on prize_deliveries (claim_deadline) where status = 'awaiting_claim';
create index prize_deliveries_user_idx on prize_deliveries (user_id, id desc);
