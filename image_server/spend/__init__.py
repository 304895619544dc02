"""Spend: what renders cost (price tables), what was spent (ledger) and the ceilings
(per-request ``max_cost``, daily and monthly budgets per generator)."""
