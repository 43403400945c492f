"""What crosses the wire between the aggregator and the merchants: the typed messages both sides build and read
(``messages``), and model updates as compressed deltas from the global model (``codec``: fp16, or int8 with
per-tensor scales and stochastic rounding). Flower's records (flwr.app) are the only Flower it imports."""
