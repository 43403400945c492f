"""Loaders: the happy paths, and every malformed case as one error naming file, line and column."""

import json
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedaug.common.config import DataSection
from fedaug.common.data import EVENT_TYPES
from fedaug.common.data.loaders import load, load_catalog
from fedaug.common.data.source import load_catalog_data, load_data
from fedaug.common.errors import DataError, DataWarning
from fedaug.common.recommend.bundle import BundleCatalog
from fedaug.runtime.export import write_catalog_tsv


def write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


# ---------------------------------------------------------------- events: happy paths


def test_events_csv_orders_by_time_drops_duplicates_and_keeps_side_information(tmp_path):
    path = write(tmp_path, "events.csv", "\n".join([
        "user_id,item_id,timestamp,event_type,merchant_id,device",
        "7,100,1700000300,purchase,shopA,app",
        "7,200,1700000100,view,shopA,web",
        "7,200,1700000100,view,shopA,web",  # exact duplicate
        "9,300,1700000000,cart,shopB,web",
        "7,300,1700000200,click,shopA,app",
        "9,100,1700000050,view,shopB,app",
    ]))
    data = load(path, "events")
    assert data.n_users == 2 and data.n_items == 3 and data.n_interactions == 5
    raw = data.catalog.raw_ids
    assert [raw[i] for i in data.sequence(0)] == [200, 300, 100]  # user 7, time order
    assert [raw[i] for i in data.sequence(1)] == [300, 100]
    assert [EVENT_TYPES[e] for e in data.event_type[:3]] == ["view", "click", "purchase"]
    assert data.merchant_names == ["shopA", "shopB"] and list(data.merchant) == [0, 1]
    assert list(data.timestamps[:3]) == [1700000100, 1700000200, 1700000300]
    assert set(data.context) == {"device"} and len(data.context["device"]) == 5


def test_events_iso_timestamps_and_parquet(tmp_path):
    frame = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5],
                          "timestamp": ["2024-01-02T00:00:00Z", "2024-01-01T00:00:00Z", "2024-01-03T10:00:00+02:00"]})
    csv = write(tmp_path, "iso.csv", frame.to_csv(index=False))
    data = load(csv, "events")
    assert list(data.timestamps[:2]) == [1704067200, 1704153600]  # reordered by time
    assert data.timestamps[2] == 1704268800  # 08:00 UTC
    frame.to_parquet(tmp_path / "iso.parquet")
    parquet = load(tmp_path / "iso.parquet", "events")
    assert np.array_equal(parquet.items, data.items) and np.array_equal(parquet.timestamps, data.timestamps)


def test_string_ids_number_in_natural_order_and_prefixed_integers_number_as_integers(tmp_path):
    rows = [(7, 100, 1), (7, 20, 2), (9, 3, 3), (10, 20, 4), (9, 100, 5)]
    plain = load(write(tmp_path, "plain.csv", "user_id,item_id,timestamp\n" + "\n".join(
        f"{u},{i},{t}" for u, i, t in rows)), "events")
    prefixed = load(write(tmp_path, "prefixed.csv", "user_id,item_id,timestamp\n" + "\n".join(
        f"u{u},i{i},{t}" for u, i, t in rows)), "events")
    assert prefixed.catalog.raw_ids.tolist() == ["", "i3", "i20", "i100"] and prefixed.user_ids.tolist() == [
        "u7", "u9", "u10"]
    assert np.array_equal(prefixed.items, plain.items) and np.array_equal(prefixed.offsets, plain.offsets)
    shop = load(write(tmp_path, "shop.csv", "user_id,item_id,timestamp\ncust-b,SKU-9/red,1\ncust-a,4711,2\n"
                      "cust-b,0,3\n"), "events")  # text ids: 0 is an id like any other
    assert shop.catalog.raw_ids.tolist() == ["", "0", "4711", "SKU-9/red"] and shop.user_ids.tolist() == [
        "cust-a", "cust-b"]


def test_a_shops_own_columns_and_event_names_are_mapped(tmp_path):
    from fedaug.common.data.events import EventSchema

    path = write(tmp_path, "shop.csv", "\n".join([
        "customer,product,ts,action,channel",
        "c1,p1,1700000000000,pv,web", "c1,p2,1700000060000,add_to_cart,web", "c1,p2,1700000120000,buy,app",
        "c2,p1,1700000000000,pv,app", "c2,p3,1700000030000,page_leave,app", "c2,p3,1700000090000,fav,web"]))
    with pytest.raises(DataError, match="missing required column 'user_id'"):
        load(path, "events")
    schema = EventSchema(user="customer", item="product", timestamp="ts", event_type="action",
                         events={"pv": "view", "add_to_cart": "cart", "buy": "purchase", "fav": "favourite"})
    with pytest.raises(DataError, match=r"line 6, column action: unknown event type 'page_leave'.*\[data.events\]"):
        load(path, "events", schema=schema)
    schema = replace(schema, events=schema.events | {"page_leave": "drop"})
    data = load(path, "events", schema=schema)
    assert data.n_interactions == 5 and data.user_ids.tolist() == ["c1", "c2"]
    assert [EVENT_TYPES[e] for e in data.event_type] == ["view", "cart", "purchase", "view", "favourite"]
    assert data.timestamps[0] == 1700000000 and data.timestamps[1] == 1700000060  # milliseconds, detected
    assert set(data.context) == {"channel"}
    with pytest.raises(DataError, match="column ts: Unix time .* out of range"):
        load(path, "events", schema=replace(schema, timestamp_unit="s"))
    with pytest.raises(DataError, match="line 2, column ts: not an ISO-8601 timestamp"):
        load(path, "events", schema=replace(schema, timestamp_unit="iso"))
    with pytest.raises(DataError, match="context column 'region' is not in the file"):
        load(path, "events", schema=replace(schema, context=("region",)))


def test_one_unix_time_among_iso_times_is_blamed_at_its_own_line(tmp_path):
    """The column is read the way most of its values are written: the odd one out is the fault, not line 2."""
    iso = [f"u{i % 7},i{i % 13},2024-03-01T10:{i % 60:02d}:00Z" for i in range(99)]
    path = write(tmp_path, "mixed.csv", "\n".join(["user_id,item_id,timestamp", *iso, "u1,i3,1709290000",
                                                   "u2,i4,2024-03-02T10:00:00Z"]))
    with pytest.raises(DataError, match=r"mixed.csv, line 101, column timestamp: a Unix time among ISO-8601 "
                                        r"timestamps: '1709290000'"):
        load(path, "events")
    unix = [f"u{i % 7},i{i % 13},{1709290000 + i}" for i in range(50)]
    path = write(tmp_path, "mixed2.csv", "\n".join(["user_id,item_id,timestamp", *unix, "u1,i3,2024-03-02T10:00Z"]))
    with pytest.raises(DataError, match=r"line 52, column timestamp: an ISO-8601 timestamp among Unix times"):
        load(path, "events")
    path = write(tmp_path, "garbage.csv", "\n".join(["user_id,item_id,timestamp", *iso, "u1,i3,soon"]))
    with pytest.raises(DataError, match=r"line 101, column timestamp: not an ISO-8601 timestamp: 'soon'"):
        load(path, "events")


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_a_semicolon_or_tab_separated_export_is_detected_and_reported(tmp_path, delimiter):
    from fedaug.common.data.loaders import load_counted

    rows = ["user_id,item_id,timestamp,price", "c1,SKU-1,2024-03-01T10:00:00Z,9.5",
            "c1,SKU-2,2024-03-01T11:00:00Z,3.25", "c2,SKU-1,2024-03-01T12:00:00Z,1.0"]
    comma, _ = load_counted(write(tmp_path, "comma.csv", "\n".join(rows)))
    other = write(tmp_path, "other.csv", "\n".join(row.replace(",", delimiter) for row in rows))
    data, ingested = load_counted(other)
    assert ingested.delimiter == delimiter
    assert data.user_ids.tolist() == comma.user_ids.tolist() and np.array_equal(data.items, comma.items)
    assert np.array_equal(data.timestamps, comma.timestamps) and np.allclose(data.context["price"],
                                                                            comma.context["price"])
    assert load_counted(write(tmp_path, "c.csv", "\n".join(rows)))[1].delimiter == ","
    ragged = write(tmp_path, "ragged.csv", "\n".join(row.replace(",", delimiter) for row in rows) + f"{delimiter}9")
    with pytest.raises(DataError, match="line 4: ragged line"):
        load(ragged, "events")


# ---------------------------------------------------------------- amazon-seq: happy paths


def test_amazon_seq_with_timestamps_and_attributes(tmp_path):
    seq = write(tmp_path, "Toy.txt", "1 10 20 30\n2 20 40\n")
    write(tmp_path, "Toy_time.txt", "1 100 200 300\n2 150 250\n")
    write(tmp_path, "Toy_item2attributes.json", json.dumps({"10": [1, 2], "20": [2], "30": [3], "40": [2, 3]}))
    data = load(seq, "amazon-seq")
    assert data.n_users == 2 and data.n_items == 4
    assert list(data.catalog.raw_ids) == [0, 10, 20, 30, 40]
    assert list(data.sequence(1)) == [2, 4]
    assert list(data.timestamps) == [100, 200, 300, 150, 250]
    assert list(data.catalog.attributes[4]) == [2, 3]
    # attribute 2 is the most shared one, so it is the category of every item carrying it
    assert data.catalog.category[1] == data.catalog.category[2] == data.catalog.category[4] != data.catalog.category[3]


def test_amazon_seq_named_attribute_tsv(tmp_path):
    seq = write(tmp_path, "Toy.txt", "1 1 2\n")
    tsv = write(tmp_path, "attrs.tsv", "item_id\tasin\tattributes\n1\tA1\tMakeup|Nails\n2\tA2\tMakeup\n")
    data = load(seq, "amazon-seq", attributes=tsv)
    assert data.catalog.attribute_names[1:] == ["Makeup", "Nails"]
    assert data.catalog.category_names[data.catalog.category[1]] == "Makeup"


# ---------------------------------------------------------------- malformed files

MALFORMED = [
    # (name, content, format, expected fragments of the message)
    ("missing.csv", "user_id,item_id\n1,2\n", "events", ["line 1", "missing required column 'timestamp'"]),
    ("empty_id.csv", "user_id,item_id,timestamp\n1,2,100\n1, ,200\n", "events", ["line 3", "column item_id", "empty"]),
    ("control_id.csv", "user_id,item_id,timestamp\n\"a\tb\",2,100\n", "events", ["line 2", "column user_id"]),
    ("long_id.csv", "user_id,item_id,timestamp\n1,{},100\n".format("x" * 300), "events",
     ["line 2", "column item_id", "longer than"]),
    ("badts.csv", "user_id,item_id,timestamp\n1,2,100\n1,3,yesterday\n", "events", ["line 3", "column timestamp"]),
    ("badiso.csv", "user_id,item_id,timestamp\n1,2,2024-01-01\n1,3,2024-13-45\n", "events",
     ["line 3", "column timestamp"]),
    ("empty.csv", "", "events", ["empty"]),
    ("header_only.csv", "user_id,item_id,timestamp\n", "events", ["no rows"]),
    ("ragged.csv", "user_id,item_id,timestamp\n1,2,100\n1,3,200,9\n", "events", ["line 3", "ragged"]),
    ("latin1.csv", "user_id,item_id,timestamp,city\n1,2,100,Z\xfcrich\n".encode("latin-1"), "events",
     ["line 2", "column 10", "UTF-8"]),
    ("garbage.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "events", ["line 1, column 1", "binary"]),
    ("badevent.csv", "user_id,item_id,timestamp,event_type\n1,2,100,like\n", "events", ["line 2", "column event_type"]),
    ("zero.csv", "user_id,item_id,timestamp\n1,0,100\n", "events", ["line 2", "column item_id", "padding"]),
    ("seq_nonint.txt", "1 2 3\n2 4 five 6\n", "amazon-seq", ["line 2", "column 5"]),
    ("seq_neg.txt", "1 2 -3\n", "amazon-seq", ["line 1", "column 5"]),
    ("seq_empty.txt", "\n\n", "amazon-seq", ["empty"]),
    ("seq_short.txt", "1 2 3\n4\n", "amazon-seq", ["line 2", "user id followed by"]),
    ("seq_dup.txt", "1 2 3\n1 4 5\n", "amazon-seq", ["line 2", "already appeared on line 1"]),
    ("seq_latin1.txt", "1 2 3\n2 3 \xe9\n".encode("latin-1"), "amazon-seq", ["line 2", "column 5", "UTF-8"]),
    ("seq_garbage.txt", bytes(range(256)), "amazon-seq", ["line 1", "binary"]),
]


@pytest.mark.parametrize("name,content,fmt,fragments", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_gives_one_located_error(tmp_path, name, content, fmt, fragments):
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as info:
        load(path, fmt)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_ragged_timestamp_file(tmp_path):
    seq = write(tmp_path, "Toy.txt", "1 10 20 30\n2 20 40\n")
    write(tmp_path, "Toy_time.txt", "1 100 200 300\n2 150\n")
    with pytest.raises(DataError, match=r"Toy_time.txt, line 2: ragged line: 1 timestamps for 2 items"):
        load(seq, "amazon-seq")


def test_timestamp_file_with_bad_value(tmp_path):
    seq = write(tmp_path, "Toy.txt", "1 10 20\n")
    write(tmp_path, "Toy_time.txt", "1 100 2x0\n")
    with pytest.raises(DataError, match=r"Toy_time.txt, line 1, column 7"):
        load(seq, "amazon-seq")


def test_attribute_json_errors(tmp_path):
    seq = write(tmp_path, "Toy.txt", "1 10 20\n")
    bad_json = write(tmp_path, "a.json", '{"10": [1, 2],\n "20": [3,, 4]}')
    with pytest.raises(DataError, match=r"a.json, line 2, column 11: invalid JSON"):
        load(seq, "amazon-seq", attributes=bad_json)
    bad_value = write(tmp_path, "b.json", '{"10": [1, "red"]}')
    with pytest.raises(DataError, match=r"b.json, column key '10'"):
        load(seq, "amazon-seq", attributes=bad_value)


def test_attribute_tsv_ragged(tmp_path):
    seq = write(tmp_path, "Toy.txt", "1 10 20\n")
    tsv = write(tmp_path, "a.tsv", "item_id\tasin\tattributes\n10\tA\tX\n20\tB\n")
    with pytest.raises(DataError, match=r"a.tsv, line 3: ragged line"):
        load(seq, "amazon-seq", attributes=tsv)


# ---------------------------------------------------------------- the public catalog: ids, texts, attributes

PRODUCTS = ("item_id\ttitle\tbrand\tasin\tattributes\n"
            "A\tRed lipstick\tAcme\tX1\tMakeup|Lips\n"
            "B\tNail polish\t\tX2\tMakeup|Nails|Unknown\n"
            "C\t\tBrandC\tX3\t\n")


def test_catalog_with_title_brand_and_attributes_has_texts_and_reports_the_unused_column(tmp_path):
    path = write(tmp_path, "products.tsv", PRODUCTS)
    with pytest.warns(DataWarning, match=r"products.tsv: column asin not used"):
        catalog = load_catalog(path)
    assert catalog.raw_ids.tolist() == ["", "A", "B", "C"]
    assert catalog.attribute_names[1:] == ["Makeup", "Lips", "Nails", "Unknown"]
    assert catalog.texts == ["", "Red lipstick | Acme | Makeup | Lips", "Nail polish | Makeup | Nails", "BrandC"]
    assert catalog.titles == ["", "Red lipstick | Acme", "Nail polish", "BrandC"]
    # [data] text_columns: which columns, in which order (asin as text now: nothing unused, no warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ordered = load_catalog(path, ("brand", "asin", "title"))
    assert ordered.texts[1] == "Acme | X1 | Red lipstick | Makeup | Lips"
    with pytest.raises(DataError, match=r"products.tsv, line 1: no column 'colour' \(data.text_columns"):
        load_catalog(path, ("title", "colour"))
    with pytest.raises(DataError, match=r"products.tsv, line 1, column 5: column 'attributes' holds attributes"):
        load_catalog(path, ("title", "attributes"))


def test_catalog_formats_before_titles_load_as_they_did(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unused in the two-column format, whatever its second column is called
        two = load_catalog(write(tmp_path, "two.tsv", "item_id\tcategories\n10\tMakeup|Nails\n20\tMakeup\n"))
        titles_only = load_catalog(write(tmp_path, "t.tsv", "item_id\ttitle\n10\tPolish\n20\tLipstick\n"))
        as_json = load_catalog(write(tmp_path, "c.json", json.dumps({"10": [1, 2], "20": [2]})))
    assert two.raw_ids.tolist() == [0, 10, 20] and two.attribute_names[1:] == ["Makeup", "Nails"] and two.texts is None
    assert titles_only.attributes is None and titles_only.texts == ["", "Polish", "Lipstick"]
    assert as_json.attribute_names[1:] == ["attr1", "attr2"] and as_json.texts is None
    for name, content, message in (
            ("dup.tsv", "item_id\ttitle\ttitle\n1\ta\tb\n", r"line 1, column 3: column 'title' appears twice"),
            ("ids.tsv", "item_id\n1\n", "line 1: header names no attributes or text column")):
        with pytest.raises(DataError, match=message):
            load_catalog(write(tmp_path, name, content))


def test_catalog_and_data_texts_together_keep_the_texts_in_every_command(tmp_path):
    """`[data] catalog` with `[data] texts`: the merchant's data (baseline --model text, simulate, local) and the
    aggregator's catalog alone both carry every catalog item's text, numbered by the catalog."""
    shop = write(tmp_path, "shop.csv", "user_id,item_id,timestamp\nu1,10,1\nu1,20,2\nu2,20,1\nu2,10,2\n")
    catalog = write(tmp_path, "catalog.tsv", "item_id\tattributes\n30\tMakeup\n20\tMakeup|Nails\n10\tLips\n")
    titles = write(tmp_path, "titles.tsv", "item_id\tasin\ttitle\n10\tX\tLipstick\n20\tY\tPolish\n30\tZ\tCream\n")
    expected = ["", "Lipstick | Lips", "Polish | Makeup | Nails", "Cream | Makeup"]
    section = DataSection(path=shop, catalog=catalog, texts=titles)
    data = load_data(section)
    assert data.catalog.raw_ids.tolist() == [0, 10, 20, 30] and data.catalog.texts == expected
    assert data.catalog.raw_ids[data.sequence(0)].tolist() == [10, 20]
    assert load_catalog_data(DataSection(catalog=catalog, texts=titles)).catalog.texts == expected  # the aggregator
    assert BundleCatalog.of(data.catalog).titles == expected[1:]
    # a catalog with titles of its own: they win, and [data] texts is not needed
    own = write(tmp_path, "own.tsv", "item_id\ttitle\tattributes\n10\tRed lipstick\tLips\n20\tPolish\t\n30\tCream\t\n")
    assert load_data(DataSection(path=shop, catalog=own, texts=titles)).catalog.texts[1:] == ["Red lipstick | Lips",
                                                                                               "Polish", "Cream"]
    assert load_catalog_data(DataSection(catalog=own)).catalog.texts[1:] == ["Red lipstick | Lips", "Polish", "Cream"]


def test_texts_found_next_to_the_data_survive_alignment_to_a_catalog_without_texts(tmp_path):
    seq = write(tmp_path, "Toy.txt", "1 10 20\n2 20\n")
    write(tmp_path, "Toy_item_titles.tsv", "item_id\tasin\ttitle\n10\tX\tLipstick\n20\tY\tPolish\n")
    catalog = write(tmp_path, "catalog.tsv", "item_id\tattributes\n10\tLips\n20\tNails\n30\tFace\n")
    data = load_data(DataSection(path=seq, catalog=catalog))
    assert data.catalog.texts == ["", "Lipstick", "Polish", ""]  # 30: not in this data, no title known here


def test_a_written_catalog_reads_back_with_the_same_items_texts_and_attributes(tmp_path):
    """Beauty's layout: anonymous attribute ids (the JSON) and texts from titles and named attributes; the written
    catalog keeps the titles, the named attributes as tags, and the anonymous attributes."""
    seq = write(tmp_path, "Toy.txt", "1 10 20 30\n2 20 40\n")
    write(tmp_path, "Toy_item2attributes.json", json.dumps({"10": [1, 2], "20": [2], "30": [3], "40": [2, 3]}))
    write(tmp_path, "Toy_item_attributes_named.tsv",
          "item_id\tasin\tattributes\n10\tA\tOPI|Nails\n20\tB\tNails\n30\tC\tFace\n40\tD\tNails|Face\n")
    write(tmp_path, "Toy_item_titles.tsv", "item_id\tasin\ttitle\n10\tA\tOPI polish\n20\tB\tTop coat\n40\tD\tDuo\n")
    data = load(seq, "amazon-seq")
    assert data.catalog.texts[1:] == ["OPI polish | OPI | Nails", "Top coat | Nails", "Face", "Duo | Nails | Face"]
    write_catalog_tsv(data.catalog, tmp_path / "catalog.tsv")
    lines = (tmp_path / "catalog.tsv").read_text().splitlines()
    assert lines[:2] == ["item_id\ttitle\ttags\tattributes", "10\tOPI polish\tOPI | Nails\tattr1|attr2"]
    back = load_catalog(tmp_path / "catalog.tsv")
    assert back.raw_ids.tolist() == data.catalog.raw_ids.tolist() and back.texts == data.catalog.texts
    assert [[back.attribute_names[a] for a in attrs] for attrs in back.attributes] == [
        [data.catalog.attribute_names[a] for a in attrs] for attrs in data.catalog.attributes]
    # real attribute names are written once, as attributes, and come back in the text from there
    named = load(seq, "amazon-seq", attributes=tmp_path / "Toy_item_attributes_named.tsv")
    write_catalog_tsv(named.catalog, tmp_path / "named.tsv")
    assert (tmp_path / "named.tsv").read_text().splitlines()[:2] == ["item_id\ttitle\tattributes",
                                                                     "10\tOPI polish\tOPI|Nails"]
    assert load_catalog(tmp_path / "named.tsv").texts == named.catalog.texts


def test_corrupt_parquet(tmp_path):
    path = write(tmp_path, "x.parquet", b"PAR1 this is not parquet PAR1")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load(path, "events")


def test_parquet_bad_value_names_row_and_column(tmp_path):
    pd.DataFrame({"user_id": [1, 2], "item_id": ["4", ""], "timestamp": [1, 2]}).to_parquet(tmp_path / "v.parquet")
    with pytest.raises(DataError, match=r"v.parquet, row 2, column item_id: empty id"):
        load(tmp_path / "v.parquet", "events")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "nope.csv")
    path = write(tmp_path, "x.csv", "user_id,item_id,timestamp\n1,2,3\n")
    with pytest.raises(DataError, match="unknown format 'xml'"):
        load(path, "xml")


# ---------------------------------------------------------------- Arrow's fast paths against a plain reference

_event_rows = st.lists(st.tuples(st.sampled_from(["u2", "u10", "u9", " u2 ", "7"]),
                                 st.sampled_from(["i1", "i10", "i2", "B00x", "i1 "]),
                                 st.integers(1_600_000_000, 1_600_000_005),
                                 st.sampled_from(["view", "cart", " Purchase"])), min_size=1, max_size=40)


def _natural(text: str):
    import re

    prefix, digits, rest = re.match(r"^(\D*)(\d*)(.*)$", text, re.DOTALL).groups()
    return prefix, len(digits.lstrip("0")), digits.lstrip("0"), rest, text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_event_rows, st.sampled_from(["s", "ms", "iso", "padded", "parquet"]))
def test_the_loader_equals_a_plain_reference(tmp_path, rows, form):
    """Whatever path a column takes (Arrow casts, dictionaries, or the row-by-row fallback for padded values),
    the result is the reference's: stripped ids in natural order, time order with ties in file order, exact
    duplicates dropped."""
    stamp = {"s": str, "ms": lambda t: str(t * 1000), "padded": lambda t: f" {t} ", "parquet": str,
             "iso": lambda t: pd.Timestamp(t, unit="s", tz="UTC").isoformat()}[form]
    frame = pd.DataFrame({"user_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                          "timestamp": [stamp(r[2]) for r in rows], "event_type": [r[3] for r in rows]})
    if form == "parquet":
        path = tmp_path / "events.parquet"
        frame.to_parquet(path, row_group_size=7)  # several row groups: dictionaries unified across chunks
    else:
        path = write(tmp_path, "events.csv", frame.to_csv(index=False))
    data = load(path, "events")

    clean = [(u.strip(), i.strip(), t, e.strip().lower()) for u, i, t, e in rows]
    kept = list(dict.fromkeys(clean))  # exact duplicates once, first occurrence first
    users = sorted({u for u, *_ in kept}, key=_natural)
    assert [str(u) for u in data.user_ids] == users
    for index, user in enumerate(users):
        events = sorted((r for r in kept if r[0] == user), key=lambda r: r[2])  # stable: ties in file order
        assert [str(data.catalog.raw_ids[i]) for i in data.sequence(index)] == [r[1] for r in events]
        span = slice(data.offsets[index], data.offsets[index + 1])
        assert data.timestamps[span].tolist() == [r[2] for r in events]
        assert [EVENT_TYPES[e] for e in data.event_type[span]] == [r[3] for r in events]


@pytest.mark.parametrize("form", ["csv", "parquet"])
def test_a_large_log_with_ties_mixed_spellings_and_dropped_events_equals_a_plain_reference(tmp_path, form):
    """20,000 events whose times span 0 to 1e11 s with many ties (the sort packs time and row in one key, then user
    and position in another), ids spelled with spaces and leading zeros, an event name mapped to "drop", exact
    duplicates, merchants and context columns: every output array is the plain reference's."""
    from fedaug.common.data.events import EventSchema

    rng = np.random.default_rng(3)
    n = 20_000
    user_names = [f"u{u}" for u in range(600)] + [" u7 ", "u07", "7", "x"]
    item_names = [f"i{i}" for i in range(300)] + ["i1 ", "i01", "B00x", "10"]
    shop = {u.strip(): f"m{len(u.strip()) % 3 * 5}" for u in user_names}  # one merchant per user
    users = [user_names[u] for u in rng.integers(0, len(user_names), n)]
    frame = pd.DataFrame({
        "user_id": users, "item_id": [item_names[i] for i in rng.integers(0, len(item_names), n)],
        "timestamp": rng.choice([0, 1, 2, 1_700_000_000, 99_999_999_999], n),
        "event_type": rng.choice(["view", "cart", " Purchase", "like"], n),
        "merchant_id": [shop[u.strip()] for u in users],
        "device": rng.choice(["web", "app", " ios"], n), "price": rng.choice([0.5, 1.25, 9.99], n)})
    frame = pd.concat([frame, frame.iloc[rng.integers(0, n, 500)]], ignore_index=True)  # exact duplicates
    if form == "parquet":
        path = tmp_path / "events.parquet"
        frame.to_parquet(path, row_group_size=3_000)
    else:
        path = write(tmp_path, "events.csv", frame.to_csv(index=False))
    data = load(path, "events", schema=EventSchema(events={"like": "drop"}))

    rows = [(u.strip(), i.strip(), t, e.strip().lower(), m, d.strip(), p) for u, i, t, e, m, d, p in
            frame.itertuples(index=False)]
    kept = [r for r in dict.fromkeys(rows) if r[3] != "like"]  # exact duplicates once, first occurrence first
    kept = sorted(kept, key=lambda r: (_natural(r[0]), r[2]))  # stable: ties in file order
    users_in_order = sorted({r[0] for r in kept}, key=_natural)
    items_in_order = sorted({r[1] for r in kept}, key=_natural)
    devices = sorted({r[5] for r in rows})
    assert data.user_ids.tolist() == users_in_order
    assert data.catalog.raw_ids.tolist() == ["", *items_in_order]  # text ids, as spelled once stripped
    assert data.items.tolist() == [items_in_order.index(r[1]) + 1 for r in kept]
    assert data.lengths.tolist() == [sum(r[0] == u for r in kept) for u in users_in_order]
    assert data.timestamps.tolist() == [r[2] for r in kept]
    assert [EVENT_TYPES[e] for e in data.event_type] == [r[3] for r in kept]
    assert data.merchant_names == sorted(set(shop.values()))
    assert [data.merchant_names[m] for m in data.merchant] == [shop[u] for u in users_in_order]
    assert data.context["device"].tolist() == [devices.index(r[5]) for r in kept]
    assert data.context["price"].tolist() == [np.float32(r[6]) for r in kept]


def test_the_time_order_equals_lexsort_in_every_packing():
    """One packed key, two passes, or lexsort (by the bits the times and rows need): always the stable order."""
    from fedaug.common.data.events import _user_time_order

    rng = np.random.default_rng(5)
    for n, span in ((1_000, 50), (1_000, 2**40), (1_000, 2**60)):
        user = rng.integers(0, 40, n).astype(np.int32)
        ts = rng.choice(rng.integers(0, span, 30), n)  # many ties
        expected = np.lexsort((ts, user))
        order, users, times = _user_time_order(ts, lambda user=user: user)
        assert order.tolist() == expected.tolist() and users.tolist() == user[expected].tolist()
        assert times.tolist() == ts[expected].tolist()


# ---------------------------------------------------------------- fuzzing: never anything but DataError

_settings = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_settings
@given(st.binary(max_size=300))
def test_fuzz_events_bytes(tmp_path, blob):
    _load_or_data_error(write(tmp_path, "fuzz.csv", b"user_id,item_id,timestamp\n" + blob), "events")


@_settings
@given(st.text(alphabet=st.sampled_from(list("0123456789 \n\t-x.\x00é")), max_size=200))
def test_fuzz_amazon_seq_text(tmp_path, text):
    _load_or_data_error(write(tmp_path, "fuzz.txt", text.encode("utf-8")), "amazon-seq")


def _load_or_data_error(path, fmt):
    try:
        data = load(path, fmt)
    except DataError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    assert data.n_interactions > 0
    assert data.items.min() >= 1 and data.items.max() <= data.n_items
