"""Aggregator side: Flower ServerApp, strategies, checkpoints, monitoring (next issues)."""
