"""The merchant's configuration: data and model as for the baseline, plus [augment], [privacy] and [local]."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from common.config import AugmentSection, BaselineConfig, ModelSection, Section

from .trainer import GRAD_SAMPLE_MODES, LocalSettings, PrivacySettings


class BudgetSection(Section):
    """A merchant's own privacy budget: ε over every round it ever trains ("inf" = non-private) and δ."""

    epsilon: float = Field(8.0, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)

    @field_validator("epsilon", mode="before")
    @classmethod
    def _parse_inf(cls, value):
        return math.inf if isinstance(value, str) and value.strip().lower() in ("inf", "infinity") else value


class PrivacySection(BudgetSection):
    """[privacy]: the budget plus how DP-SGD clips (the training recipe)."""

    max_grad_norm: float = Field(1.0, gt=0)
    grad_sample_mode: Literal[GRAD_SAMPLE_MODES] = "ghost"  # type: ignore[valid-type]


class LocalSection(Section):
    rounds: int = Field(1, ge=1)
    """Rounds this run plans (for `fedaug local`: training rounds back to back; noise is calibrated for all)."""
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0

    def settings(self) -> LocalSettings:
        return LocalSettings(local_epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed)


class MerchantModelSection(ModelSection):
    tie_embeddings: bool = False  # Opacus cannot clip shared weights


class MerchantConfig(BaselineConfig):
    model: MerchantModelSection = MerchantModelSection()
    augment: AugmentSection = AugmentSection()
    privacy: PrivacySection = PrivacySection()
    local: LocalSection = LocalSection()

    @model_validator(mode="after")
    def _no_tied_weights_under_dp(self):
        if self.model.tie_embeddings and not math.isinf(self.privacy.epsilon):
            raise ValueError("model.tie_embeddings must be false for private training "
                             "(Opacus cannot clip shared weights)")
        return self

    def privacy_settings(self) -> PrivacySettings:
        return PrivacySettings(epsilon=self.privacy.epsilon, delta=self.privacy.delta,
                               max_grad_norm=self.privacy.max_grad_norm,
                               grad_sample_mode=self.privacy.grad_sample_mode, planned_rounds=self.local.rounds)


RUN_CONFIG_KEYS = {
    # Flower run_config / node_config key -> dotted MerchantConfig key
    "data-path": "data.path",
    "data-format": "data.format",
    "data-attributes": "data.attributes",
    "data-timestamps": "data.timestamps",
    "catalog-path": "data.catalog",
    "k-core": "data.k_core",
    "hidden": "model.hidden",
    "blocks": "model.blocks",
    "heads": "model.heads",
    "max-len": "model.max_len",
    "dropout": "model.dropout",
    "item-dim": "model.item_dim",
    "catalog": "model.catalog",
    "attribute-noise": "augment.attribute_sigma",
    "augment": "augment.enabled",
    "augment-views": "augment.views",
    "augment-use-as": "augment.use_as",
    "epsilon": "privacy.epsilon",
    "epsilon-budget": "privacy.epsilon",
    "delta": "privacy.delta",
    "max-grad-norm": "privacy.max_grad_norm",
    "grad-sample-mode": "privacy.grad_sample_mode",
    "num-server-rounds": "local.rounds",
    "local-epochs": "local.local_epochs",
    "batch-size": "local.batch_size",
    "lr": "local.lr",
    "seed": "local.seed",
    "device": "device",
}


def merchant_config_from(*flower_configs: dict) -> MerchantConfig:
    """Build a MerchantConfig from Flower's flat run_config / node_config (later ones win); unknown keys are
    ignored, since Flower passes its own keys (partition-id, state-dir, ...) alongside ours."""
    from common.config import load_config

    overrides: dict = {}
    for flat in flower_configs:
        for key, value in flat.items():
            if key in RUN_CONFIG_KEYS and value != "":
                overrides[RUN_CONFIG_KEYS[key]] = value
    return load_config(None, overrides, MerchantConfig)
