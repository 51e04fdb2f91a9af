"""Orders: checkout, the order state machine, shipments, and giving units back."""
