"""What both daemons need to run Flower, shared by the aggregator service (server/) and the merchant daemon
(client/): Flower's own processes, the gRPC health check, the Fleet API's public door, trial certificates and
merchant data files for trials, and Flower's private API behind one adapter (``flower``), which server/, client/
and simulations/ import instead of Flower's internals. Nothing in common/ needs them."""
