"""HTTP clients of the control path: Kong's Admin/Status API and pushgateways.

Never used on a request: the plugin reads Kong's targets from a background thread.
"""
