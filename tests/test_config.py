"""TOML configs and Flower's run_config: one set of models, sections a role does not use refused, private-training
constraints checked before anything runs, errors naming the file and the key, flags over the file."""

import dataclasses
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from fedaug.common.config import (
    BaselineConfig,
    FederationConfig,
    MerchantRunConfig,
    ModelSection,
    from_run_config,
    load_config,
    to_run_config,
)
from fedaug.common.data.source import event_schema
from fedaug.common.errors import ConfigError
from fedaug.common.model.sasrec import SASRecConfig
from fedaug.simulations.scenario import SimulationConfig


def _toml(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_file_values_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nhidden = 32\nheads = 4\n[train]\nlr = 0.01\nepochs = 3\n')
    cfg = load_config(path, {"train.epochs": 5})
    assert isinstance(cfg, BaselineConfig)
    assert cfg.model.hidden == 32 and cfg.train.lr == 0.01 and cfg.train.epochs == 5
    assert SASRecConfig.from_section(cfg.model, 100).hidden == 32


@pytest.mark.parametrize("text,fragment", [
    ("[train]\nlr = 0\n", "key train: Extra inputs are not permitted"),
    ("[local]\nlr = 0\n", "key local.lr: Input should be greater than 0"),
    ("[local]\nbatch = 3\n", "key local.batch: Extra inputs are not permitted"),
    ("[model]\nhidden = 30\nheads = 4\n", "key model: hidden (30) must be divisible by heads (4)"),
    ("[model]\nkind = 'gru'\n", "key model.kind"),
    ("[model]\nkind = 'pop'\n", "key model.kind: a merchant trains sasrec"),
    ("[data\n", "invalid TOML"),
    ("[augment]\nops = ['crop', 'spin']\n", "key augment.ops.1"),
    ("[privacy]\nepsilon = 'inf'\n[model]\ntie_embeddings = true\n", None),
    ("[privacy]\nepsilon = 'inf'\n[model]\nloss = 'sampled'\n", None),
    ("[model]\ntie_embeddings = true\n", "key model.tie_embeddings: must be false for private training"),
    ("[model]\nloss = 'sampled'\n", "key model.loss: 'sampled' is not supported under DP"),
    ("[federation]\nrounds = 3\n", "key federation: Extra inputs are not permitted"),
])
def test_merchant_config_errors_name_file_and_key(tmp_path, text, fragment):
    path = _toml(tmp_path, text)
    if fragment is None:
        assert math.isinf(load_config(path, None, MerchantRunConfig).privacy.epsilon)
        return
    with pytest.raises(ConfigError) as info:
        load_config(path, None, MerchantRunConfig)
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text,key", [
    ("[train]\nepochs = 7\n", "key train:"),
    ("[local]\nrounds = 3\n", "key local.rounds:"),  # a federation's rounds are [federation] rounds
    ("[local]\nseed = 3\n", "key local.seed:"),  # and its seed is [federation] seed
    ("[aggregator]\naddress = 'h:1'\n", "key aggregator:"),
    ("[merchant]\nsuperlink = 'h:1'\n", "key merchant:"),
])
def test_sections_a_role_does_not_use_are_refused(tmp_path, text, key):
    path = _toml(tmp_path, text)
    with pytest.raises(ConfigError, match=f"^{path}: {key}"):
        load_config(path, None, SimulationConfig)
    with pytest.raises(ConfigError):
        load_config(None, {"train.epochs": 7}, SimulationConfig)


def test_role_defaults():
    assert BaselineConfig().model.tie_embeddings  # non-private: tied tables
    merchant = MerchantRunConfig()
    assert not merchant.model.tie_embeddings and merchant.local.max_batch_size == 256 and merchant.local.rounds == 1
    federation = FederationConfig()
    assert federation.model.item_dim == 8 and federation.model.catalog == "auto"
    assert federation.local.batch_size == "auto" and federation.local.max_batch_size == 1024
    assert federation.local.lr == 0.03
    # a role default yields to what the user gives, key by key
    given = load_config(None, {"local.lr": 0.1}, FederationConfig)
    assert given.local.lr == 0.1 and given.local.max_batch_size == 1024


def test_a_nonprivate_federation_gets_the_central_recipe_and_a_sweep_switches_regimes():
    """ε = inf: the central baseline's tied wide tables and lr, smaller batches, several local epochs; a config
    changed to another ε takes that regime's defaults, while what the user set stays."""
    central = BaselineConfig()
    nonprivate = load_config(None, {"privacy.epsilon": "inf"}, FederationConfig)
    assert nonprivate.model.tie_embeddings and nonprivate.model.catalog is False and nonprivate.model.item_dim is None
    assert nonprivate.local.lr == central.train.lr
    # a merchant's tenth of the users takes more, smaller steps a round than a central epoch's share of them
    assert nonprivate.local.batch_size < central.train.batch_size and nonprivate.local.local_epochs > 1
    base = load_config(None, {"local.lr": 0.05, "model.hidden": 32}, SimulationConfig)
    switched = base.changed(privacy={"epsilon": math.inf})
    assert switched.model.tie_embeddings and switched.local.batch_size == nonprivate.local.batch_size
    assert switched.local.lr == 0.05 and switched.model.hidden == 32  # the user's own values travel
    back = switched.changed(privacy={"epsilon": 8.0})
    assert back.model.item_dim == 8 and back.local.max_batch_size == 1024 and back.local.lr == 0.05


def test_flower_run_config_round_trips_with_the_same_names():
    config = load_config(None, {"model.hidden": 32, "privacy.epsilon": "inf", "augment.ops": ["crop", "mask"],
                                "federation.rounds": 3}, SimulationConfig)
    flat = to_run_config(config)
    assert flat["model.hidden"] == 32 and flat["federation.rounds"] == 3 and flat["privacy.epsilon"] == "inf"
    assert flat["augment.ops"] == "crop,mask" and "privacy.delta" not in flat  # no lists, no nulls in Flower
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert from_run_config(flat, SimulationConfig) == config


def test_run_config_empty_means_default_and_errors_name_the_key():
    config = from_run_config({"model.hidden": 32, "privacy.delta": "", "model.item_dim": ""})
    assert config.model.hidden == 32 and config.privacy.delta is None and config.model.item_dim == 8  # role default
    with pytest.raises(ConfigError, match="^run_config: key model.hidden: Input should be greater"):
        from_run_config({"model.hidden": 0})
    with pytest.raises(ConfigError, match="^run_config: key simulation: Extra inputs"):
        from_run_config({"simulation.merchants": 3})
    node = {"privacy.epsilon": 2.0}  # a merchant's node_config overrides the recipe's budget
    assert from_run_config({"privacy.epsilon": 8.0}, FederationConfig, node).privacy.epsilon == 2.0


def test_data_mapping_errors_name_their_key(tmp_path):
    path = tmp_path / "shop.toml"
    path.write_text('[data]\npath = "shop.csv"\n[data.events]\npv = "likes"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: key data.events.pv: "):
        load_config(path, None, SimulationConfig)
    path.write_text('[data]\npath = "Beauty.txt"\n[data.columns]\nuser = "customer"\n')
    with pytest.raises(ConfigError, match="data.columns and data.events map an events file"):
        load_config(path, None, SimulationConfig)
    path.write_text('[data.columns]\ntimestamp_unit = "minutes"\n')
    with pytest.raises(ConfigError, match="key data.columns.timestamp_unit"):
        load_config(path, None, SimulationConfig)
    mapped = load_config(None, {"data.path": "shop.csv", "data.columns.context": "channel, region"}, SimulationConfig)
    assert event_schema(mapped.data).context == ("channel", "region")
    # Over Flower's flat configs "no context columns" stays that, not "every other column".
    none = load_config(None, {"data.path": "shop.csv", "data.columns.context": [], "data.events": {"pv": "view"}},
                       SimulationConfig)
    assert event_schema(from_run_config(to_run_config(none), SimulationConfig).data).context == ()
    assert from_run_config(to_run_config(none), SimulationConfig) == none


def test_reading_a_setting_loads_neither_torch_nor_flower():
    """fedaug.common.config is the leaf every part reads: importing it (in a fresh interpreter) loads no ML stack."""
    code = ("import sys, fedaug.common.config; heavy = [m for m in ('torch', 'flwr') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_model_config_takes_every_value_from_the_model_section():
    """SASRecConfig has no defaults of its own to disagree with [model]: its fields are the section's (less what
    only building reads) plus what the data decides; the role decides tie_embeddings."""
    fields = dataclasses.fields(SASRecConfig)
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
    assert {f.name for f in fields} == (set(ModelSection.model_fields) - {"kind", "catalog"}) | {"n_items",
                                                                                                 "n_attributes"}
    assert SASRecConfig.from_section(BaselineConfig().model, 10).tie_embeddings  # non-private: tied
    assert not SASRecConfig.from_section(MerchantRunConfig().model, 10).tie_embeddings  # a merchant: Opacus


def _settings_doc():
    path = Path(__file__).resolve().parents[1] / "scripts" / "settings_doc.py"
    spec = importlib.util.spec_from_file_location("settings_doc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pyproject_and_readme_settings_are_generated_from_the_models():
    """The run_config tables Flower accepts and the README's settings reference are written from the models
    (`python scripts/settings_doc.py --write`); a hand edit or a changed model shows here."""
    doc = _settings_doc()
    pyproject = doc.PYPROJECT.read_text(encoding="utf-8")
    assert doc.with_flwr_tables(pyproject) == pyproject, f"pyproject.toml differs from the models: run `{doc.COMMAND}`"
    readme = doc.README.read_text(encoding="utf-8")
    assert doc.with_reference(readme) == readme, f"README.md differs from the models: run `{doc.COMMAND}`"
    assert doc.with_flwr_tables(pyproject.replace("\nhidden = 64\n", "\nhidden = 65\n", 1)) == pyproject
    assert doc.with_reference(readme.replace("| `hidden` | `64` |", "| `hidden` | `65` |", 1)) == readme
    # every table of every role is in the reference, and every key says what it does
    documented = " ".join(block.group("names") for block in doc.BLOCK.finditer(readme)).split()
    assert sorted(documented) == sorted(doc.sections())
    blank = [f"{name}.{key}" for name, section in doc.sections().items() for key, field in section.model_fields.items()
             if not field.description and not doc.is_section(field.annotation)]
    assert blank == []
