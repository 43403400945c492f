"""One-off measurements behind the results page, each a script over `fedaug simulate` or the baseline
(``python -m fedaug.simulations.experiments.<name> --help``): update compression over seeds, behaviour and context
vectors, the DP statistics alone, the release rule's weights, statistics served from a checkpoint. Their outputs
live in simulations/results/."""
