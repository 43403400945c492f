"""What a model is fused with, and the public rules that fuse it: the local sentence encoder's item vectors
(``text``) and the text prior they give (``text_prior``), popularity (``popularity``), the merchants' DP
collaborative statistics and the rule that cuts them by their own noise (``dp_counts``), score fusion with the
prior (``fusion``), the federated DP evaluation's figures on the fusion weights (``fusion_weights``) and the
composite every mode hands out (``composite``)."""
