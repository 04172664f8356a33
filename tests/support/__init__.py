"""Helpers that start real processes (pushgateway, Consul, ...) for the tests."""
