"""pgwshard-sync: health sources -> membership -> sinks (Kong, file_sd) -> rebalance.

`daemon` runs the loop over `settings`; `health` holds the sources, `registration` registers
pushgateways in Consul, `sinks` writes the healthy set, `metrics` exposes what happened.
"""
