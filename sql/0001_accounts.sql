-- Shoppers, their mini-program identities, refresh tokens, and merchant (admin) accounts.

create table users (
    id            bigint generated always as identity primary key,
    nickname      text not null default '' check (length(nickname) <= 64),
    avatar_url    text not null default '' check (length(avatar_url) <= 1024),
    phone         text check (phone ~ '^\+?[0-9]{5,20}$'),
    inviter_id    bigint references users (id),
    channel       text check (length(channel) <= 64),
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now()
);
create index users_inviter_idx on users (inviter_id) where inviter_id is not null;

-- One row per (provider, appid, openid): a shopper is recognised across mini-programs by unionid.
create table user_identities (
    id          bigint generated always as identity primary key,
    user_id     bigint not null references users (id),
    provider    text not null check (provider in ('wechat', 'dev')),
    appid       text not null,
    openid      text not null,
    unionid     text,
    phone       text,
    created_at  timestamptz not null default now(),
    unique (provider, appid, openid)
);
create index user_identities_user_idx on user_identities (user_id);
create index user_identities_unionid_idx on user_identities (unionid) where unionid is not null;

-- Rotating refresh tokens: only the SHA-256 of the token is stored. All tokens of one login
-- share a family; presenting a rotated (used) token revokes the whole family.
create table refresh_tokens (
    id           bigint generated always as identity primary key,
    token_hash   bytea not null unique,
    family_id    uuid not null,
    user_id      bigint not null references users (id),
    created_at   timestamptz not null default now(),
    expires_at   timestamptz not null,
    used_at      timestamptz,
    revoked_at   timestamptz
);
create index refresh_tokens_family_idx on refresh_tokens (family_id);
create index refresh_tokens_user_idx on refresh_tokens (user_id);

create table admins (
    id             bigint generated always as identity primary key,
    username       text not null unique check (username ~ '^[A-Za-z0-9_.@-]{3,64}$'),
    password_hash  text not null,
    is_active      boolean not null default true,
    created_at     timestamptz not null default now(),
    last_login_at  timestamptz
);
