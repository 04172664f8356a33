"""Moving groups to their owners after membership changes (`rebalancer`), and turning a group
as Pushgateway's API lists it back into a push body (`exposition`)."""
