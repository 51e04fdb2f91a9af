-- A flash-sale purchase's Idempotency-Key is kept with its order, not only in Redis: a retry
-- after Redis forgot the key (its TTL, a flush) can never make a second order, and a rebuild of
-- the sale's counters puts the keys back so the retry is answered with the first order.
alter table flash_sale_orders add column idempotency_key text;
alter table flash_sale_orders add column address_id bigint;
create unique index flash_sale_orders_idempotency_idx
    on flash_sale_orders (flash_sale_id, user_id, idempotency_key) where idempotency_key is not null;

-- Winners' batches no longer update one hot row per item (two API processes' batches queued on
-- its lock): an item's sold units are counted from its order and return rows, and the SKU's and
-- product's sales take a flash sale's units once, at settlement.
alter table flash_sale_items drop column sold;
alter table flash_sale_items add column sales_counted integer;
