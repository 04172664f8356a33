"""The nginx + Lua host that speaks Kong's plugin-server protocol: its Lua files and nginx
template ship as package data beside this module."""
