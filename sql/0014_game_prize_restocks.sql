-- A live prize's stock raised by an operator (加奖 during a live stream). The raise commits in
-- PostgreSQL first; Redis learns of it after the commit, once per restock (`game_restock.lua`
-- marks x:<id> in the game's state hash), so Redis never offers a unit PostgreSQL did not commit.
-- `redis_done` is false until then: the worker's restore_pending retries what a crash or a Redis
-- error left, and a rebuild from PostgreSQL counts every committed restock in the stock itself.
set local lock_timeout = '5s';

create table game_prize_restocks (
    id          bigint generated always as identity primary key,
    game_id     bigint not null references games (id),
    prize_id    bigint not null references game_prizes (id),
    position    integer not null,
    added       integer not null check (added > 0),
    stock_after integer not null check (stock_after > 0),
    admin_id    bigint references admins (id),
    created_at  timestamptz not null default now(),
    redis_done  boolean not null default false
);
create index game_prize_restocks_game_idx on game_prize_restocks (game_id, id);
create index game_prize_restocks_pending_idx on game_prize_restocks (id) where not redis_done;
