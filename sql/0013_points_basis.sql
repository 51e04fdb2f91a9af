-- The fen an order's points were earned on (what was paid and kept when the order completed).
-- A refund's reversal is then the difference between what the earning was and what the order
-- as it is now would earn at the same rate, so it is right whether the refund finished before
-- or after the earning, and in whatever order the two events are delivered. Null for entries
-- written before this column (their refunds reverse their own share, as before).
set local lock_timeout = '5s';
alter table points_entries add column basis bigint check (basis > 0);
