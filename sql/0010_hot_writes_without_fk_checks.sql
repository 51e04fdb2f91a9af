-- The rows written for every flash-sale winner carry no foreign-key checks and two fewer index
-- entries. Measured on the winners' one-statement batch (loadtests/bench_persist: 24 orders,
-- two connections): 120–144 µs of PostgreSQL CPU per order with the checks, 74–82 µs without
-- them (BENCHMARKS.md). Each check is a
-- `SELECT … FOR KEY SHARE` per row. The ones on the sale, its item and the SKU lock the same row
-- for every order, so two batches in flight share those locks as MultiXacts.
--
-- What the checks guarded is kept by construction:
-- * the link, the order, its line and its event are inserted by one statement, which joins the
--   item, the sale, the SKU and the product, so a missing row means no insert;
-- * users and SKUs are never deleted, and an item cannot be removed once it has sold: the edit
--   that removes it asks Redis first, atomically with the purchase script
--   (flash_warm_item.lua, mode 'remove'), so an edit that commits after the start is refused;
-- * orders are never deleted.
-- Unique keys and CHECKs stay: they are what a race could break.
alter table flash_sale_orders
    drop constraint flash_sale_orders_flash_sale_id_fkey,
    drop constraint flash_sale_orders_item_id_fkey,
    drop constraint flash_sale_orders_user_id_fkey,
    drop constraint flash_sale_orders_order_id_fkey,
    -- The order's id comes from nextval in the same statement. Lookups go by reservation id,
    -- or by item (the per-shopper index) joined to `orders` by primary key.
    drop constraint flash_sale_orders_order_id_key;
-- A sale's links are found through its items (flash_sale_orders_item_user_idx), and its keyed
-- links through flash_sale_orders_idempotency_idx.
drop index flash_sale_orders_sale_idx;

alter table orders drop constraint orders_user_id_fkey;
alter table order_lines
    drop constraint order_lines_order_id_fkey,
    drop constraint order_lines_sku_id_fkey;
alter table order_events drop constraint order_events_order_id_fkey;
