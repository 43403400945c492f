"""Experiment runs over fedaug's components: the centralised baseline, one merchant alone, federated simulations
(with the simulation-only behaviour: partitions, Byzantine merchants, central evaluation), sweeps, reports, plots
and the privacy audit."""
