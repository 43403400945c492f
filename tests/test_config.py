"""TOML configs: sections validate, errors name the file and the key, flags override the file."""

import pytest

from client.config import MerchantConfig, merchant_config_from
from common.config import BaselineConfig, load_config
from common.errors import ConfigError


def test_file_values_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nhidden = 32\nheads = 4\n[train]\nlr = 0.01\nepochs = 3\n')
    cfg = load_config(path, {"train.epochs": 5})
    assert isinstance(cfg, BaselineConfig)
    assert cfg.model.hidden == 32 and cfg.train.lr == 0.01 and cfg.train.epochs == 5
    assert cfg.model.sasrec(100).hidden == 32


@pytest.mark.parametrize("text,fragment", [
    ("[train]\nlr = 0\n", "key train.lr: Input should be greater than 0"),
    ("[train]\nbatch = 3\n", "key train.batch: Extra inputs are not permitted"),
    ("[model]\nhidden = 30\nheads = 4\n", "key model: hidden (30) must be divisible by heads (4)"),
    ("[model]\nkind = 'gru'\n", "key model.kind"),
    ("[data\n", "invalid TOML"),
    ("[augment]\nops = ['crop', 'spin']\n", "key augment.ops.1"),
    ("[privacy]\nepsilon = 'inf'\n[model]\ntie_embeddings = true\n", None),
    ("[model]\ntie_embeddings = true\n", "model.tie_embeddings must be false for private training"),
])
def test_config_errors_name_file_and_key(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    if fragment is None:
        assert load_config(path, None, MerchantConfig).model.tie_embeddings
        return
    with pytest.raises(ConfigError) as info:
        load_config(path, None, MerchantConfig)
    assert str(info.value).startswith(str(path)) and fragment in str(info.value)


def test_flower_run_config_maps_onto_sections():
    cfg = merchant_config_from({"local-epochs": 2, "epsilon": "inf", "augment": False, "partition-id": 3},
                               {"epsilon-budget": 5.0, "data-path": ""})
    assert cfg.local.local_epochs == 2 and cfg.privacy.epsilon == 5.0 and not cfg.augment.enabled
    assert cfg.data.path is None and cfg.augment.settings() is None
