"""The result cache: earlier renders reused for requests that fully determine their output,
and identical requests in flight rendered once (coalescing)."""
