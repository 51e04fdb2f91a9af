"""The hot-path machinery (DESIGN.md, "The hot-path contract"), shared by every crowd-facing decision.

Coupon claims use it first; flash sales and games reuse it: a Lua script decides and XADDs the
reservation (`HotPath.reserve`), the API group-commits winners before answering
(`HotPath.commit`), the worker persists whatever an API process died on (`persist_stream`), and
`shop reconcile` rebuilds the counters from PostgreSQL (shop/reconcile.py).
"""

from shop.hotpath.commit import GroupCommitter, HotPath, ScriptsNotSent, hotpath_of
from shop.hotpath.streams import (
    GROUP,
    PERSISTERS,
    Reservation,
    consumer_name,
    count_tail,
    encode_payload,
    ensure_group,
    new_reservation_id,
    parse_entry,
    persist_backlog,
    persist_stream,
    register_persister,
    register_stream,
    register_streams_over,
    registered_streams,
    streams_past_end,
    trim_acknowledged,
    unregister_stream,
)

__all__ = [
    "GROUP",
    "PERSISTERS",
    "GroupCommitter",
    "HotPath",
    "Reservation",
    "ScriptsNotSent",
    "consumer_name",
    "count_tail",
    "encode_payload",
    "ensure_group",
    "hotpath_of",
    "new_reservation_id",
    "parse_entry",
    "persist_backlog",
    "persist_stream",
    "register_persister",
    "register_stream",
    "register_streams_over",
    "registered_streams",
    "streams_past_end",
    "trim_acknowledged",
    "unregister_stream",
]
