-- Marketing games: what reaches Redis after a commit is recorded, so it is applied exactly once
-- (a job retries what a crash or a Redis error left), and goods prizes hold their units out of
-- SKU stock from activation until they are claimed or the game is settled.

-- A unit given back (expired card, unclaimed goods) that Redis has not been told of yet.
alter table game_draws add column return_pending boolean not null default false;
create index game_draws_return_pending_idx on game_draws (id) where return_pending;

-- An extra-chance grant that Redis has not been told of yet. The grants before this migration
-- were added to Redis inside their own transaction.
alter table game_chance_grants add column redis_done boolean not null default false;
update game_chance_grants set redis_done = true;
create index game_chance_grants_pending_idx on game_chance_grants (id) where not redis_done;

-- Goods prizes: units of the SKU taken out of its stock at activation and not yet consumed by a
-- winner's prize order nor given back. Settling a game over gives back what no winner holds.
alter table game_prizes add column held integer not null default 0 check (held >= 0);
alter table games add column settled_at timestamptz;
create index games_unsettled_idx on games (ends_at) where settled_at is null and status <> 'draft';
