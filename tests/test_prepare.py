"""`fedaug prepare`: the public Amazon review and metadata files (2014 and 2018 releases) as the amazon-seq files
every command reads, k-core cut, time-ordered, with titles and named attributes; bad input is one line, exit 1,
nothing written."""

import gzip
import json
from pathlib import Path

import pytest

from fedaug.common.data.loaders import load
from tests.support import BEAUTY_DIR
from tests.support import run_fedaug as fedaug

# Users u1..u6 review items A..F. u6 has 2 reviews (cut by a 3-core); item F is reviewed by u6 and u1 only, so it
# falls below 3 once u6 is gone, and u1 keeps 3 reviews. u2's reviews of B and C share a time: file order decides.
REVIEWS = [
    ("u1", "A", 30), ("u1", "F", 5), ("u1", "B", 10), ("u1", "C", 20),
    ("u2", "C", 50), ("u2", "B", 50), ("u2", "A", 40),
    ("u3", "A", 1), ("u3", "B", 2), ("u3", "D", 3),
    ("u4", "D", 7), ("u4", "C", 8), ("u4", "E", 9),
    ("u5", "E", 4), ("u5", "D", 6), ("u5", "A", 5), ("u5", "E", 2),
    ("u6", "F", 1), ("u6", "E", 2),
    ("u5", "B", 3, 0.0),  # rated 0: dropped
]
TITLES = {"A": "Red\tnail  polish", "B": "Blue lipstick", "C": "Green shampoo", "D": "Hair oil", "E": None,
          "F": "Rare cream"}
BRANDS = {"A": "Acme", "B": "Acme", "C": "Bolt", "D": "Acme", "E": "", "F": "Bolt"}
PATHS = {"A": [["Beauty", "Makeup", "Nails"]], "B": [["Beauty", "Makeup", "Lips"]], "C": [["Beauty", "Hair"]],
         "D": [["Beauty", "Hair"], ["Beauty", "Makeup", "Nails"]], "E": [["Beauty", "Skin"]], "F": [["Beauty"]]}


def reviews_lines():
    for user, item, time, *rating in REVIEWS:
        yield json.dumps({"reviewerID": user, "asin": item, "unixReviewTime": time, "overall": (rating or [5.0])[0],
                          "reviewText": "fine", "reviewTime": "01 1, 2014"})


def meta_2014():  # Python literals, as the 2014 release writes them
    for item in ["Z", *TITLES]:  # Z: reviewed by no one
        record = {"asin": item, "categories": PATHS.get(item, [["Beauty"]]), "price": 9.5, "salesRank": {"B": 1}}
        if TITLES.get(item):
            record["title"] = TITLES[item]
        if BRANDS.get(item):
            record["brand"] = BRANDS[item]
        yield repr(record)


def meta_2018():  # JSON, with one flat category path
    for item in TITLES:
        yield json.dumps({"asin": item, "title": TITLES[item] or "", "brand": BRANDS[item],
                          "category": PATHS[item][0], "price": "$9.50"})


def write(path: Path, lines, gz: bool) -> Path:
    text = "\n".join(lines) + "\n"
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_prepare_2014_files_give_the_amazon_seq_layout_every_command_loads(tmp_path):
    reviews = write(tmp_path / "reviews_Toy_5.json.gz", reviews_lines(), gz=True)
    meta = write(tmp_path / "meta_Toy.json.gz", meta_2014(), gz=True)
    out = tmp_path / "toy"
    result = fedaug("prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out), "--core", "3",
                    "--attribute-core", "2")
    assert result.returncode == 0, result.stderr
    assert "5 users, 5 items, 16 events" in result.stderr and "4 items with a title" in result.stderr
    assert "expected" not in result.stderr  # no published counts for this file
    assert sorted(p.name for p in out.iterdir()) == ["Toy.txt", "Toy_item_attributes_named.tsv",
                                                    "Toy_item_titles.tsv", "Toy_time.txt"]
    # users in order of their first review, items numbered as they first appear; each history in time order
    assert (out / "Toy.txt").read_text().splitlines() == ["1 1 2 3", "2 3 2 1", "3 3 1 4", "4 4 2 5", "5 5 5 3 4"]
    assert (out / "Toy_time.txt").read_text().splitlines()[:2] == ["1 10 20 30", "2 40 50 50"]
    assert (out / "Toy_item_titles.tsv").read_text().splitlines() == [
        "item_id\tasin\ttitle", "1\tB\tBlue lipstick", "2\tC\tGreen shampoo", "3\tA\tRed nail polish",
        "4\tD\tHair oil", "5\tE\t"]
    # brand, then every category below the top level; "Bolt", "Lips" and "Skin" (one kept item each: F was cut)
    # fall under --attribute-core
    assert (out / "Toy_item_attributes_named.tsv").read_text().splitlines() == [
        "item_id\tasin\tattributes", "1\tB\tAcme|Makeup", "2\tC\tHair", "3\tA\tAcme|Makeup|Nails",
        "4\tD\tAcme|Hair|Makeup|Nails", "5\tE\t"]

    data = load(out / "Toy.txt", "amazon-seq")
    assert (data.n_users, data.n_items, len(data.items)) == (5, 5, 16)
    text_of = dict(zip(data.catalog.raw_ids[1:].tolist(), data.catalog.texts[1:], strict=True))
    assert text_of[3] == "Red nail polish | Acme | Makeup | Nails" and text_of[5] == ""
    assert data.timestamps[:3].tolist() == [10, 20, 30]


def test_prepare_2018_json_files_and_the_default_names(tmp_path):
    reviews = write(tmp_path / "Toy_5.json", reviews_lines(), gz=False)
    meta = write(tmp_path / "meta_Toy.json", meta_2018(), gz=False)
    out = tmp_path / "toy"
    result = fedaug("prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(out), "--core", "3",
                    "--attribute-core", "2", "--name", "Toys")
    assert result.returncode == 0, result.stderr
    assert (out / "Toys.txt").read_text() == "1 1 2 3\n2 3 2 1\n3 3 1 4\n4 4 2 5\n5 5 5 3 4\n"
    assert (out / "Toys_item_attributes_named.tsv").read_text().splitlines()[4] == "4\tD\tAcme|Hair"
    assert f"--data {out / 'Toys.txt'} --format amazon-seq" in result.stderr


def test_prepare_1_core_keeps_everything_rated(tmp_path):
    from fedaug.common.data.prepare import prepare

    reviews = write(tmp_path / "reviews_Toy.json", reviews_lines(), gz=False)
    meta = write(tmp_path / "meta_Toy.json", meta_2014(), gz=False)
    done = prepare(reviews=reviews, meta=meta, out=tmp_path / "all", core=1)
    assert (done.users, done.items, done.events) == (6, 6, 19) and done.expected is None
    assert done.files[0] == tmp_path / "all" / "Toy.txt"


@pytest.mark.parametrize("bad, message", [
    ('{"reviewerID": "u1", "asin": "A", "unixReviewTime": 3, "overall": 5.0}\n{"reviewerID": "u1", "asin": ',
     "line 2: not a JSON object"),
    ('{"reviewerID": "u1", "unixReviewTime": 3, "overall": 5.0}\n', "line 1: missing field 'asin'"),
    ('{"reviewerID": "u1", "asin": "A", "unixReviewTime": "soon", "overall": 5.0}\n', "line 1: unixReviewTime"),
])
def test_bad_reviews_stop_with_one_line_naming_the_file_and_line_and_write_nothing(tmp_path, bad, message):
    (tmp_path / "reviews.json").write_text(bad)
    meta = write(tmp_path / "meta.json", meta_2014(), gz=False)
    result = fedaug("prepare", "--reviews", str(tmp_path / "reviews.json"), "--meta", str(meta), "--out",
                    str(tmp_path / "out"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "reviews.json" in result.stderr and message in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_a_bad_metadata_line_or_a_used_out_dir_writes_nothing(tmp_path):
    reviews = write(tmp_path / "reviews_Toy_5.json", reviews_lines(), gz=False)
    meta = write(tmp_path / "meta_Toy.json", [*meta_2014(), "{'asin': 'A', 'title': 'broken"], gz=False)
    result = fedaug("prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "out"),
                    "--core", "3")
    assert result.returncode == 1 and "meta_Toy.json, line 8" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    again = fedaug("prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "used"))
    assert again.returncode == 1 and "not an empty directory" in again.stderr


def test_the_public_beauty_files_give_the_results_data_set(tmp_path):
    """With the public 2014 files in the workspace (../shared/data/amazon-beauty), prepare gives the counts the
    results were measured on, and the same history lengths as the workspace's Beauty.txt."""
    reviews = next((p for p in (BEAUTY_DIR / "reviews_Beauty_5.json.gz", BEAUTY_DIR / "reviews_Beauty_5.json")
                    if p.is_file()), None)
    meta = next((p for p in (BEAUTY_DIR / "meta_Beauty.json.gz", BEAUTY_DIR / "meta_Beauty.json") if p.is_file()),
                None)
    if reviews is None or meta is None:
        pytest.skip(f"the raw Amazon Beauty files (reviews_Beauty_5.json.gz, meta_Beauty.json.gz) are not in "
                    f"{BEAUTY_DIR}")
    result = fedaug("prepare", "--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "beauty"))
    assert result.returncode == 0, result.stderr
    assert "22,363 users, 12,101 items, 198,502 events" in result.stderr and "matches" in result.stderr
    lengths = sorted(len(line.split()) for line in (tmp_path / "beauty" / "Beauty.txt").read_text().splitlines())
    assert lengths == sorted(len(line.split()) for line in (BEAUTY_DIR / "Beauty.txt").read_text().splitlines())
