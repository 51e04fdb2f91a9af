-- Two indexes that no query reads, each written once for every order (and for every flash-sale
-- winner inside the group commit's statement):
-- * orders_activity_idx (kind, activity_id): activity reports go through each activity's own
--   link table (flash_sale_orders by item, coupons by template), joined to `orders` by primary key;
-- * order_events_order_idx (order_id, id): the outbox is read by its pending index only.
-- Measured on the winners' statement (loadtests/bench_persist, 16 orders, two connections,
-- 2026-11-26, a noisy machine): WAL per order 1 947 bytes with them, 1 789 without; PostgreSQL
-- CPU per order 199–202 µs with them and 173–181 µs without in one pair of runs, though the
-- same code measured 190–208 µs in the next pair. A report that needs one can bring it back.
drop index orders_activity_idx;
drop index order_events_order_idx;
