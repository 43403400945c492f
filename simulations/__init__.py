"""Experiment runs over fedaug's components: the centralised baseline now; federated simulations and sweeps next."""
