"""Privacy mechanisms that are not the DP-SGD engine's: distributed Skellam noise for pooled releases through secure
aggregation (``skellam``: each merchant's noise share, the mechanism's Rényi-DP bound and the Gaussian noise
multiplier an RDP accountant may compose it as). Numbers only: neither torch nor Flower loads here."""
