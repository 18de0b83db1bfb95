"""The fleet: what several gateways share through Redis."""
