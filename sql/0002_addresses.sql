-- Shoppers' shipping addresses. Orders copy an address into the order (a snapshot), so rows here
-- can be edited or deleted freely.

create table addresses (
    id           bigint generated always as identity primary key,
    user_id      bigint not null references users (id),
    receiver     text not null check (length(receiver) between 1 and 32),
    phone        text not null check (phone ~ '^1[3-9][0-9]{9}$'),
    province     text not null check (length(province) between 1 and 32),
    city         text not null check (length(city) between 1 and 32),
    -- Empty for the few prefecture-level cities without districts (e.g. 东莞市, 中山市).
    district     text not null default '' check (length(district) <= 32),
    detail       text not null check (length(detail) between 1 and 200),
    postal_code  text check (postal_code ~ '^[0-9]{6}$'),
    is_default   boolean not null default false,
    created_at   timestamptz not null default now(),
    updated_at   timestamptz not null default now()
);
create index addresses_user_idx on addresses (user_id, id);
-- At most one default per shopper; writers lock the users row first, so this never fires in a race.
create unique index addresses_one_default_idx on addresses (user_id) where is_default;
