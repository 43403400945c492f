"""Hostile inputs at every boundary, generated: data files, attribute/catalog files, TOML configs, CLI flags and
model updates arriving at the aggregator. Each malformed case must end in one line naming what and where, a
non-zero exit (or a rejected update with its reason), no traceback, and nothing written — no output directory, no
ledger rows."""

from __future__ import annotations

import contextlib
import io
import json
import string
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedaug.cli import main
from fedaug.client.daemon import MerchantDaemonConfig
from fedaug.common.config import MerchantRunConfig, load_config
from fedaug.common.data.loaders import load, load_catalog
from fedaug.common.errors import ConfigError, DataError
from fedaug.common.protocol.messages import (
    ARRAYS,
    METRICS,
    TRAIN,
    USERS,
    TrainFigures,
    TrainInstruction,
    TrainReply,
    Update,
)
from fedaug.server.aggregator import AggregatorConfig
from fedaug.server.replies import sort_train_replies
from fedaug.simulations.scenario import SimulationConfig

pytestmark = pytest.mark.usefixtures("as_if_inside_a_serverapp")  # messages built as a ServerApp builds them

FUZZ = settings(max_examples=50, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def run_cli(*args: str) -> tuple[int, str]:
    """``fedaug ARGS`` in this process: (exit code, stderr)."""
    err = io.StringIO()
    argv, sys.argv = sys.argv, ["fedaug", *args]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return code, err.getvalue()


def assert_one_line(text: str, *fragments: str) -> None:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --- data files ---------------------------------------------------------------------------------------------

ROWS = st.lists(st.tuples(st.integers(1, 50), st.integers(1, 80), st.integers(1_600_000_000, 1_700_000_000)),
                min_size=2, max_size=8)
EVENT_CORRUPTIONS = {  # any text is an id (SKUs, ASINs, "-5", "9.5"), but not these
    "user id is empty": ("user_id", lambda r: " " * r.randint(0, 3)),
    "item id holds a control character": ("item_id", lambda r: f'"{r.randint(1, 9)}\x01{r.randint(1, 9)}"'),
    "item id is overlong": ("item_id", lambda r: "".join(r.choices(string.ascii_letters, k=257 + r.randint(0, 9)))),
    "item id zero": ("item_id", lambda r: "0"),
    "timestamp is a word": ("timestamp", lambda r: r.choice(["soon", "yesterday", "n/a", "2024-13-45"])),
    "timestamp is empty": ("timestamp", lambda r: ""),
    "timestamp is negative": ("timestamp", lambda r: str(-r.randint(1, 10**9))),
}


@FUZZ
@given(rows=ROWS, corruption=st.sampled_from(sorted(EVENT_CORRUPTIONS)), which=st.integers(0, 7),
       seed=st.integers(0, 2**16))
def test_malformed_event_cells_name_file_line_and_column(rows, corruption, which, seed):
    import random

    column, bad = EVENT_CORRUPTIONS[corruption]
    table = [dict(zip(("user_id", "item_id", "timestamp"), map(str, row), strict=True)) for row in rows]
    row = which % len(table)
    table[row][column] = bad(random.Random(seed))
    text = "user_id,item_id,timestamp\n" + "\n".join(",".join(r.values()) for r in table) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "events.csv"
        path.write_text(text)
        with pytest.raises(DataError) as error:
            load(path)
        message = str(error.value)
        assert_one_line(message, str(path), f"line {row + 2}", f"column {column}")
        code, err = run_cli("local", "--data", str(path), "--out", str(Path(tmp) / "out"))
        assert code == 1
        assert_one_line(err, "events.csv", f"line {row + 2}")
        assert not (Path(tmp) / "out").exists()  # no output, no ledger


STRUCTURE = {
    "missing column": lambda rows: "user_id,item_id\n" + "\n".join(f"{u},{i}" for u, i, _ in rows),
    "ragged row": lambda rows: "user_id,item_id,timestamp\n" + "\n".join(f"{u},{i},{t}" for u, i, t in rows)
    + "\n1,2,3,4,5",
    "header only": lambda rows: "user_id,item_id,timestamp\n",
    "duplicate header": lambda rows: "user_id,item_id,timestamp,item_id\n" + "\n".join(
        f"{u},{i},{t},{i}" for u, i, t in rows),
    "nul byte": lambda rows: "user_id,item_id,timestamp\n1,2,\x003\n",
    "latin-1 byte": lambda rows: b"user_id,item_id,timestamp\n1,2,3\n" + b"\xe9\n",
    "empty": lambda rows: "",
}


@FUZZ
@given(rows=ROWS, corruption=st.sampled_from(sorted(STRUCTURE)),
       suffix=st.sampled_from([".csv", ".parquet"]))
def test_malformed_event_files_are_refused_whole(rows, corruption, suffix):
    content = STRUCTURE[corruption](rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"events{suffix}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DataError) as error:
            load(path, "events")
        assert_one_line(str(error.value), str(path))


AMAZON_CORRUPTIONS = {
    "word token": lambda r: f"{r.randint(1, 9)} 3 x{r.randint(0, 9)} 4",
    "negative item": lambda r: f"{r.randint(1, 9)} 3 -{r.randint(1, 9)}",
    "item zero": lambda r: f"{r.randint(1, 9)} 0 3",
    "user alone": lambda r: f"{r.randint(60, 99)}",
    "repeated user": lambda r: "1 5 6",
    "float item": lambda r: f"{r.randint(60, 99)} 2.5 3",
}


@FUZZ
@given(users=st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=6), min_size=1, max_size=6),
       corruption=st.sampled_from(sorted(AMAZON_CORRUPTIONS)), seed=st.integers(0, 2**16))
def test_malformed_amazon_lines_name_their_line(users, corruption, seed):
    import random

    lines = [f"{u} " + " ".join(map(str, items)) for u, items in enumerate(users, start=1)]
    bad = AMAZON_CORRUPTIONS[corruption](random.Random(seed))
    at = seed % (len(lines) + 1)
    lines.insert(at, bad)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seq.txt"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError) as error:
            load(path, "amazon-seq")
        assert_one_line(str(error.value), str(path), "line")


STAGES = ("view", "click", "favourite", "cart", "purchase", "drop")
NAMES = st.text(string.ascii_lowercase + "_", min_size=2, max_size=10)
TIME_FORMS = {"s": str, "ms": lambda t: str(t * 1000),
              "iso": lambda t: pd.Timestamp(t, unit="s", tz="UTC").isoformat()}
MAPPED_CORRUPTIONS = ("none", "unmapped event name", "column renamed away", "time in another form", "empty user")


@FUZZ
@given(rows=ROWS, columns=st.lists(NAMES, min_size=4, max_size=4, unique=True),
       names=st.lists(NAMES, min_size=3, max_size=3, unique=True),
       targets=st.lists(st.sampled_from(STAGES), min_size=3, max_size=3),
       form=st.sampled_from(sorted(TIME_FORMS)), stated=st.booleans(),
       corruption=st.sampled_from(MAPPED_CORRUPTIONS), which=st.integers(0, 7))
def test_shop_logs_under_their_own_names_load_or_fail_in_one_line(rows, columns, names, targets, form, stated,
                                                                   corruption, which):
    """Random column names, event names and timestamp forms, mapped by [data.columns] / [data.events]: the file
    loads exactly as its standard-named twin; a corruption fails in one line naming file, line and column."""
    from fedaug.common.data.events import EventSchema

    user, item, ts, action = columns
    schema = EventSchema(user=user, item=item, timestamp=ts, event_type=action,
                         events=dict(zip(names, targets, strict=True)),
                         timestamp_unit=form if stated else "auto")
    body = [[f"u{u}", f"sku-{i}", TIME_FORMS[form](t), names[k % 3]] for k, (u, i, t) in enumerate(rows)]
    row = which % len(body)
    header = [user, item, ts, action]
    if corruption == "unmapped event name":
        body[row][3] = "zz_not_mapped"
    elif corruption == "column renamed away":
        header[2] = ts + "_x"
    elif corruption == "time in another form":
        body[row][2] = "soon" if form != "iso" else "2024-99-99"
    elif corruption == "empty user":
        body[row][0] = ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shop.csv"
        path.write_text(",".join(header) + "\n" + "\n".join(",".join(r) for r in body) + "\n")
        kept = [k for k in range(len(rows)) if targets[k % 3] != "drop"]
        if corruption == "none" and kept:
            data = load(path, "events", schema=schema)
            assert data.n_interactions <= len(kept) and data.timestamps.min() >= min(t for _, _, t in rows)
            assert set(data.catalog.raw_ids[1:]) <= {f"sku-{i}" for _, i, _ in rows}
            return
        if corruption == "none":  # every event mapped to "drop"
            with pytest.raises(DataError, match="every event was dropped"):
                load(path, "events", schema=schema)
            return
        with pytest.raises(DataError) as error:
            load(path, "events", schema=schema)
        where = ["line 1"] if corruption == "column renamed away" else [f"line {row + 2}", "column"]
        assert_one_line(str(error.value), str(path), *where)


ATTRIBUTE_FILES = {
    "json not an object": ("a.json", "[1, 2, 3]"),
    "json syntax": ("a.json", '{"1": [2, 3], "2": [4'),
    "json empty key": ("a.json", '{" ": [2]}'),
    "json attributes not a list": ("a.json", '{"1": 5}'),
    "json negative attribute": ("a.json", '{"1": [-2]}'),
    "tsv wrong header": ("a.tsv", "item\tattributes\n1\tx\n"),
    "tsv ragged": ("a.tsv", "item_id\tattributes\n1\tx\textra\n"),
    "tsv empty id": ("a.tsv", "item_id\tattributes\n \tx\n"),
    "empty": ("a.tsv", ""),
}


@FUZZ
@given(case=st.sampled_from(sorted(ATTRIBUTE_FILES)), padding=st.integers(0, 5))
def test_malformed_attribute_and_catalog_files(case, padding):
    name, content = ATTRIBUTE_FILES[case]
    if name.endswith(".tsv") and content:
        head, *rest = content.splitlines()
        content = "\n".join([head] + [f"{100 + k}\tok" for k in range(padding)] + rest) + "\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(content)
        with pytest.raises(DataError) as error:
            load_catalog(path)
        assert_one_line(str(error.value), str(path))
        seq = Path(tmp) / "seq.txt"
        seq.write_text("1 100 101 102\n")
        with pytest.raises(DataError) as error:
            load(seq, "amazon-seq", attributes=path)
        assert_one_line(str(error.value), str(path))


# --- TOML configs -------------------------------------------------------------------------------------------

SCHEMAS = {
    "merchant": (MerchantRunConfig, {"privacy": {"epsilon": 4.0}, "local": {"rounds": 2},
                                     "model": {"hidden": 32, "behaviour": True, "context_columns": ["price"],
                                               "target_weights": {"view": 0.5, "purchase": 2.0}},
                                     "augment": {"behaviour_sigma": 0.05, "context_sigma": 0.05}}),
    "simulation": (SimulationConfig, {"federation": {"rounds": 3}, "simulation": {"merchants": 4}}),
    "aggregator": (AggregatorConfig, {"aggregator": {"merchant_keys": ["k.pub"]}, "data": {"catalog": "c.tsv"},
                                      "federation": {"rounds": 2}}),
    "daemon": (MerchantDaemonConfig, {"merchant": {"superlink": "h:1"}, "data": {"path": "d.csv",
                                                                                   "catalog": "c.tsv"}}),
}
BAD_VALUES = st.one_of(st.text(string.ascii_letters, min_size=1, max_size=6), st.just(-7), st.just([1, 2]),
                       st.just({"x": 1}))


@FUZZ
@given(schema=st.sampled_from(sorted(SCHEMAS)), kind=st.sampled_from(["unknown", "wrong value", "syntax", "section"]),
       name=st.text(string.ascii_lowercase, min_size=3, max_size=8), value=BAD_VALUES, pick=st.integers(0, 99))
def test_malformed_configs_name_the_file_and_key(schema, kind, name, value, pick):
    import tomli_w

    model, valid = SCHEMAS[schema]
    raw = json.loads(json.dumps(valid))
    section = sorted(raw)[pick % len(raw)]
    if kind == "unknown":
        raw[section][f"zz_{name}"] = 1
        expected = f"key {section}.zz_{name}"
    elif kind == "section":  # a table this role does not use
        raw[f"zz_{name}"] = {"x": 1}
        expected = f"key zz_{name}"
    elif kind == "wrong value":
        key = sorted(raw[section])[pick % len(raw[section])]
        raw[section][key] = value
        text_valued = ("catalog", "path", "context_columns")  # any text is a valid path or column list
        expected = f"key {section}.{key}" if not isinstance(value, str) or key not in text_valued else ""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        text = tomli_w.dumps(raw) if kind != "syntax" else tomli_w.dumps(raw) + f"\n[{name}\n"
        path.write_text(text)
        if kind == "wrong value" and not expected:
            return  # a string path is a valid path; nothing to refuse
        with pytest.raises(ConfigError) as error:
            load_config(path, None, model)
        message = str(error.value)
        assert_one_line(message, str(path))
        if kind != "syntax":
            assert expected.split(".")[0] in message and expected.split(".")[-1] in message, message


# --- CLI flags ----------------------------------------------------------------------------------------------

COMMANDS = {
    "local": ["--rounds", "--local-epochs", "--batch-size", "--lr", "--epsilon", "--delta", "--max-grad-norm"],
    "simulate": ["--rounds", "--merchants", "--local-epochs", "--epsilon", "--metrics-port"],
    "baseline": ["--epochs", "--max-minutes", "--seed"],
    "audit": ["--canaries", "--guesses", "--canary-length", "--rounds", "--epsilon"],
}


@FUZZ
@given(command=st.sampled_from(sorted(COMMANDS)), pick=st.integers(0, 99),
       junk=st.text(string.ascii_letters + "-_/", min_size=1, max_size=8), unknown=st.booleans())
def test_malformed_flags_exit_non_zero_with_one_line(command, pick, junk, unknown):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        if unknown:
            args = [f"--zz-{junk.strip('-') or 'x'}", "1"]
        else:
            flag = COMMANDS[command][pick % len(COMMANDS[command])]
            args = [flag, f"x{junk}"]  # never a number, never "inf"
        code, err = run_cli(command, *args, "--out", str(out))
        assert code != 0
        assert_one_line(err, "error")
        assert not out.exists()


# --- model updates at the aggregator ------------------------------------------------------------------------

REFERENCE = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
UPDATE_CORRUPTIONS = ["nan", "inf", "shape", "dtype", "missing key", "extra key", "users zero", "users negative",
                      "users nan", "no metrics", "no arrays", "huge"]


def _sent(node: int) -> Message:
    content = TrainInstruction(ArrayRecord({k: Array(v) for k, v in REFERENCE.items()})).encode()
    msg = Message(content=content, dst_node_id=node, message_type=TRAIN)
    msg.metadata.__dict__["_message_id"] = f"m{node}"
    return msg


def _train_reply(arrays: dict[str, np.ndarray], users: int) -> RecordDict:
    """What a non-private merchant sends for its round."""
    figures = TrainFigures(users=users, train_loss=1.0, delta=0.0, noise_multiplier=0.0, seconds=1.0,
                           augment_views=0)
    return TrainReply(epsilon=1.0, update=Update(ArrayRecord({k: Array(v) for k, v in arrays.items()})),
                      figures=figures).encode()


@FUZZ
@given(corruption=st.sampled_from(UPDATE_CORRUPTIONS), row=st.integers(0, 3), col=st.integers(0, 2),
       users=st.integers(1, 10_000))
def test_malformed_updates_are_rejected_with_a_reason(corruption, row, col, users):
    arrays = {k: v + 1.0 for k, v in REFERENCE.items()}
    metrics = {}  # wire values that override what a merchant would send
    if corruption == "nan":
        arrays["w"][row, col] = np.nan
    elif corruption == "inf":
        arrays["w"][row, col] = -np.inf
    elif corruption == "shape":
        arrays["w"] = np.zeros((row + 5, col + 1), np.float32)
    elif corruption == "huge":
        arrays["w"] = np.zeros((4 * 1000, 3), np.float32)
    elif corruption == "dtype":
        arrays["b"] = arrays["b"].astype(np.float64)
    elif corruption == "missing key":
        del arrays["b"]
    elif corruption == "extra key":
        arrays["backdoor"] = np.ones(2, np.float32)
    elif corruption == "users zero":
        metrics[USERS] = 0
    elif corruption == "users negative":
        metrics[USERS] = -users
    elif corruption == "users nan":
        metrics[USERS] = float("nan")
    content = _train_reply(arrays, users)
    for key, value in metrics.items():
        content[METRICS][key] = value
    if corruption == "no metrics":
        del content[METRICS]
    if corruption == "no arrays":
        del content[ARRAYS]
    sent = [_sent(1), _sent(2)]
    good = _train_reply({k: v + 2.0 for k, v in REFERENCE.items()}, 10)
    replies = [Message(content, reply_to=sent[0]), Message(good, reply_to=sent[1])]
    result = sort_train_replies(sent, replies, REFERENCE, uniform_weights=False)
    assert result.merchants[1].status == "rejected" and result.merchants[1].reason
    assert result.merchants[2].status == "ok" and len(result.accepted) == 1
    assert [m.metadata.dst_node_id for m in sent] == [1, 2]


# --- size limits ----------------------------------------------------------------------------------------------


def test_a_10_gb_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.txt"
    with open(path, "wb") as handle:  # sparse: 10 GB long, nothing on disk, one endless line
        handle.truncate(10 * 10**9)
    with pytest.raises(DataError, match=r"huge\.txt: file is 10,000,000,000 bytes, over the .* limit"):
        load(path, "amazon-seq")
    code, err = run_cli("local", "--data", str(path), "--out", str(tmp_path / "out"))
    assert code == 1 and not (tmp_path / "out").exists()
    assert_one_line(err, "huge.txt", "FEDAUG_MAX_FILE_BYTES")


def test_overlong_lines_and_too_many_items_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDAUG_MAX_LINE_CHARS", "100")
    path = tmp_path / "seq.txt"
    path.write_text("1 2 3\n2 " + " ".join(str(i) for i in range(1, 60)) + "\n")
    with pytest.raises(DataError, match=r"seq\.txt, line 2: line is .* over the 100 limit"):
        load(path, "amazon-seq")
    monkeypatch.setenv("FEDAUG_MAX_LINE_CHARS", "1000")
    monkeypatch.setenv("FEDAUG_MAX_ITEMS", "50")
    with pytest.raises(DataError, match=r"59 distinct items, over the 50-item limit"):
        load(path, "amazon-seq")
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,timestamp\n" + "\n".join(f"1,{i},{i}" for i in range(1, 80)) + "\n")
    with pytest.raises(DataError, match=r"events\.csv: 79 distinct items"):
        load(events)
