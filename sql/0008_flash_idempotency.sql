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
--
-- Sales not yet settled had their units added to SKU and product sales as each order was written
-- (and taken off by each return): those come off again here, since settlement now adds them.
with open_items as (
    select i.sku_id, i.sold from flash_sale_items i join flash_sales f on f.id = i.flash_sale_id
    where f.status in ('published', 'stopped') and i.sold > 0
), s as (
    update skus set sales = greatest(skus.sales - o.sold, 0) from open_items o where skus.id = o.sku_id
    returning skus.product_id, o.sold
)
update products set sales = greatest(products.sales - t.sold, 0)
from (select product_id, sum(sold) as sold from s group by product_id) t
where products.id = t.product_id;
alter table flash_sale_items drop column sold;
