"""Deployment helpers shared by the aggregator service (server/) and the merchant daemon (client/): running
Flower's own processes, trial certificates, and merchant data files for trials. Nothing in common/ needs them."""
