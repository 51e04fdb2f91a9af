-- Catalog: a two-level category tree, products, their SKUs, and the stock ledger.

-- Search keys of a text: every character and every pair of neighbouring characters of each
-- whitespace-separated word, lower-cased. A GIN index over these finds substrings of Chinese
-- titles on core PostgreSQL (pg_trgm is a contrib extension that pip-packaged servers lack).
create function catalog_grams(doc text) returns text[]
language sql immutable strict parallel safe
as $$
    select coalesce(array_agg(distinct gram), '{}')
    from regexp_split_to_table(lower(doc), '\s+') as word,
         lateral generate_series(1, length(word)) as i,
         lateral (values (substr(word, i, 1)), (substr(word, i, 2))) as g (gram)
    where word <> ''
$$;

-- The keys a search query must all hit: the bigrams of each word, or the word itself when it
-- is a single character. Computed by the database so query and document lower-case alike.
create function catalog_query_grams(query text) returns text[]
language sql immutable strict parallel safe
as $$
    select coalesce(array_agg(distinct gram), '{}')
    from regexp_split_to_table(lower(query), '\s+') as word,
         lateral generate_series(1, greatest(length(word) - 1, 1)) as i,
         lateral (values (substr(word, i, 2))) as g (gram)
    where word <> ''
$$;

create table categories (
    id          bigint generated always as identity primary key,
    -- null for a top-level category; the service keeps the tree two levels deep.
    parent_id   bigint references categories (id),
    name        text not null check (length(name) between 1 and 32),
    sort_order  integer not null default 0,
    is_visible  boolean not null default true,
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    check (parent_id is null or parent_id <> id)
);
create index categories_parent_idx on categories (parent_id);

create table products (
    id            bigint generated always as identity primary key,
    category_id   bigint not null references categories (id),
    title         text not null check (length(title) between 1 and 120),
    subtitle      text not null default '' check (length(subtitle) <= 200),
    description   text not null default '' check (length(description) <= 20000),
    image_urls    text[] not null default '{}' check (cardinality(image_urls) <= 20),
    status        text not null default 'off_shelf' check (status in ('on_shelf', 'off_shelf')),
    sort_order    integer not null default 0,
    -- Spec names in the order the merchant first used them (jsonb does not keep key order).
    spec_names    text[] not null default '{}',
    -- Units sold over all SKUs, kept alongside skus.sales for the "sales" sort.
    sales         bigint not null default 0 check (sales >= 0),
    -- Lowest price among active SKUs (null when none), kept in sync by the SKU service.
    min_price     bigint check (min_price > 0),
    search_grams  text[] generated always as (catalog_grams(title || ' ' || subtitle)) stored,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now(),
    -- A shopper can never see a product that has nothing to buy.
    constraint products_on_shelf_has_price check (status = 'off_shelf' or min_price is not null)
);
create index products_category_idx on products (category_id);
-- fastupdate off: the catalog is written rarely and searched constantly, so new titles go
-- straight into the index instead of a pending list every search would have to scan.
create index products_search_idx on products using gin (search_grams) with (fastupdate = off);
-- One index per shopper sort, each over on-shelf products only, matching the keyset order.
create index products_shelf_default_idx on products (sort_order, id desc) where status = 'on_shelf';
create index products_shelf_newest_idx on products (created_at desc, id desc) where status = 'on_shelf';
create index products_shelf_sales_idx on products (sales desc, id desc) where status = 'on_shelf';
create index products_shelf_price_idx on products (min_price, id) where status = 'on_shelf';

create table skus (
    id              bigint generated always as identity primary key,
    product_id      bigint not null references products (id),
    code            text not null unique check (code ~ '^[A-Za-z0-9_.-]{1,64}$'),
    specs           jsonb not null default '{}' check (jsonb_typeof(specs) = 'object'),
    price           bigint not null check (price > 0),
    original_price  bigint check (original_price is null or original_price >= price),
    stock           integer not null default 0 check (stock >= 0),
    sales           integer not null default 0 check (sales >= 0),
    is_active       boolean not null default true,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    -- Two SKUs of one product with the same spec values could never be told apart by a shopper.
    constraint skus_product_specs_key unique (product_id, specs)
);

-- Every change of SKU stock made by a person or process, with why; stock is never overwritten.
create table stock_ledger (
    id           bigint generated always as identity primary key,
    sku_id       bigint not null references skus (id),
    delta        integer not null check (delta <> 0),
    reason       text not null check (length(reason) between 1 and 200),
    stock_after  integer not null check (stock_after >= 0),
    admin_id     bigint references admins (id),
    -- What caused it outside the admin UI, e.g. 'order:123'.
    ref          text check (length(ref) <= 100),
    created_at   timestamptz not null default now()
);
create index stock_ledger_sku_idx on stock_ledger (sku_id, id desc);
