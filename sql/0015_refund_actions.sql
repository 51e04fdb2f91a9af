-- Who did what to a refund: every operator decision on it (approve, reject, retry under a new
-- number, settle outside the provider), written in the transaction that makes it. Money leaves
-- the shop on these decisions, so each names its admin.
create table refund_actions (
    id          bigint generated always as identity primary key,
    refund_id   bigint not null references refunds (id),
    action      text not null check (action in ('approve', 'reject', 'retry', 'settle')),
    admin_id    bigint references admins (id),
    -- The refund number when the action was taken (a retry's is the number it replaced).
    refund_no   text not null,
    note        text check (length(note) <= 200),
    created_at  timestamptz not null default now()
);
create index refund_actions_refund_idx on refund_actions (refund_id, id);

-- Where the provider says the money went (WeChat Pay's user_received_account: "支付用户零钱", a
-- bank card, or, for an abnormal refund the merchant sent to its own account, that account: then
-- the shopper is still owed it).
alter table refunds add column received_account text;
