"""Aggregator side: the Flower ServerApp, strategies, reply checks, checkpoints, monitoring and the aggregator
service."""
