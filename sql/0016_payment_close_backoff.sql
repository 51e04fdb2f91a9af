-- Closing payments at the provider: a payment whose close keeps failing (a provider this
-- deployment no longer has, a persistent refusal) backs off instead of being retried at the
-- head of the queue, where 50 of them stopped every later payment from being closed.
-- `close_next_attempt_at` also leases a row to the worker that is closing it.
set local lock_timeout = '5s';
alter table payments add column close_attempts integer not null default 0;
alter table payments add column close_next_attempt_at timestamptz;
