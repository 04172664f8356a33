"""The request path's pure core: push path -> grouping key -> owner on the ring.

No I/O and nothing of the project above it: the plugin, pgwshard-sync, the rebalancer and the
CLI all compute owners with these same functions, so they agree on every key.
"""
