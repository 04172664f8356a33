"""The Kong edge: the plugin (`handler`), its config schema, its membership readers and
`pgwshard-plugin`, the plugin server Kong talks to (`server`, over `events`, `rpc` and `pdk`).

Nothing here imports pgwshard-sync or the rebalancer: a gateway node runs this alone.
"""
