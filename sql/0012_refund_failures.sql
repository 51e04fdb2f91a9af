-- A refund the payment provider ends without paying it out is 'failed' until an operator acts.
-- WeChat Pay answers ABNORMAL (the shopper's bank card or account cannot take the money; it waits
-- at WeChat Pay for the merchant) or CLOSED (the refund was closed; nothing was paid). Asking
-- again under the same refund number only gets the same answer, so the worker stops asking.
-- An operator either retries a CLOSED refund under a new number, or records that the money was
-- paid back another way (the merchant platform's abnormal-refund handling, a bank transfer).
set local lock_timeout = '5s';

alter table refunds drop constraint refunds_status_check;
alter table refunds add constraint refunds_status_check
    check (status in ('requested', 'approved', 'rejected', 'processing', 'succeeded', 'failed'));
-- What the provider last said of a failed refund (ABNORMAL, CLOSED).
alter table refunds add column provider_status text;
-- How an operator settled a failed refund outside the provider.
alter table refunds add column settled_note text check (length(settled_note) <= 200);
-- The operators' queue.
create index refunds_failed_idx on refunds (id) where status = 'failed';

-- Refund numbers a retry replaced: a late notification for one of them is recognised, not
-- refused (a refused notification is sent again and again).
create table superseded_refund_nos (
    refund_no   text primary key,
    refund_id   bigint not null references refunds (id),
    provider_status text,
    superseded_at timestamptz not null default now()
);
