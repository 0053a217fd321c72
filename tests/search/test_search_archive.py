import json

import pytest

from instatune_cli.errors import InstatuneError
from instatune_cli.search.archive import Archive
from instatune_cli.space import SearchSpace, SubNet

SPACE = SearchSpace.from_dict({"layers": [2, 3, 4], "heads": [2, 4], "ffn": [8, 16, 32]})
NAMES = ["acc", "macs"]


def _fill(arc, n=3):
    subs = [SubNet.make(2, [2, 4], [8, 16]), SubNet.make(3, 4, 32), SubNet.make(4, 2, 8)][:n]
    for i, s in enumerate(subs):
        arc.add(s, {"acc": 0.5 + i / 10, "macs": 100.0 * (i + 1), "note": "x"}, iteration=0, origin="random",
                seconds=0.1)
    return subs


def test_rows_are_written_as_they_go_and_load_back(tmp_path):
    arc = Archive.create(tmp_path, SPACE, NAMES)
    subs = _fill(arc)
    lines = (tmp_path / "archive.jsonl").read_text().splitlines()
    assert len(lines) == 3
    row = json.loads(lines[1])
    assert row["id"] == subs[1].id and row["name"] == subs[1].name and row["heads"] == [4, 4, 4]
    assert row["genes"] == SPACE.encode(subs[1]) and row["measured"] is True and row["note"] == "x"
    assert {"index", "iteration", "origin", "seconds", "acc", "macs", "layers", "ffn"} <= set(row)
    back = Archive.load(tmp_path, SPACE, NAMES)
    assert back.rows == arc.rows and back.has(subs[2].id) and not back.has("nope")


def test_never_twice_and_reserved_keys(tmp_path):
    arc = Archive.create(tmp_path, SPACE, NAMES)
    subs = _fill(arc, 1)
    with pytest.raises(InstatuneError, match="never evaluated twice"):
        arc.add(subs[0], {"acc": 1, "macs": 1}, iteration=0, origin="random", seconds=0)
    with pytest.raises(InstatuneError, match="reserved"):
        arc.add(SubNet.make(3, 2, 8), {"acc": 1, "macs": 1, "id": "x"}, iteration=0, origin="random",
                seconds=0)
    with pytest.raises(InstatuneError, match="already exists"):
        Archive.create(tmp_path, SPACE, NAMES)


def test_torn_last_line_is_ignored_and_cut_before_next_append(tmp_path):
    arc = Archive.create(tmp_path, SPACE, NAMES)
    _fill(arc, 2)
    with open(tmp_path / "archive.jsonl", "ab") as fh:
        fh.write(b'{"index":2,"id":"abc","na')  # killed mid-write
    back = Archive.load(tmp_path, SPACE, NAMES)
    assert len(back) == 2
    back.add(SubNet.make(4, 2, 8), {"acc": 0.1, "macs": 1.0}, iteration=1, origin="predicted", seconds=0)
    again = Archive.load(tmp_path, SPACE, NAMES)
    assert [r["index"] for r in again.rows] == [0, 1, 2]
    assert all(json.loads(line) for line in (tmp_path / "archive.jsonl").read_text().splitlines())


def test_complete_last_row_without_newline_is_kept(tmp_path):
    arc = Archive.create(tmp_path, SPACE, NAMES)
    _fill(arc, 2)
    p = tmp_path / "archive.jsonl"
    p.write_bytes(p.read_bytes().rstrip(b"\n"))
    back = Archive.load(tmp_path, SPACE, NAMES)
    assert len(back) == 2
    back.add(SubNet.make(4, 2, 8), {"acc": 0.1, "macs": 1.0}, iteration=1, origin="predicted", seconds=0)
    assert len(Archive.load(tmp_path, SPACE, NAMES)) == 3


def test_damage_in_the_middle_or_foreign_rows_is_an_error(tmp_path):
    arc = Archive.create(tmp_path, SPACE, NAMES)
    _fill(arc, 3)
    p = tmp_path / "archive.jsonl"
    lines = p.read_text().splitlines()
    p.write_text("\n".join([lines[0], "{garbage", lines[2]]) + "\n")
    with pytest.raises(InstatuneError, match="line 2 is not valid JSON"):
        Archive.load(tmp_path, SPACE, NAMES)
    p.write_text("\n".join([lines[0], lines[0]]) + "\n")
    with pytest.raises(InstatuneError, match="twice"):
        Archive.load(tmp_path, SPACE, NAMES)
    p.write_text(lines[0] + "\n")
    with pytest.raises(InstatuneError, match="no latency"):
        Archive.load(tmp_path, SPACE, ["acc", "latency"])
    small = SearchSpace.from_dict({"layers": [2], "heads": [2], "ffn": [8]})
    with pytest.raises(InstatuneError, match="outside the search space"):
        Archive.load(tmp_path, small, NAMES)
    with pytest.raises(InstatuneError, match="nothing to resume"):
        Archive.load(tmp_path / "none", SPACE, NAMES)


def test_csv_mirror(tmp_path):
    arc = Archive.create(tmp_path, SPACE, NAMES)
    _fill(arc, 2)
    path = arc.write_csv(extra={"feasible": [True, False]})
    text = path.read_text().splitlines()
    assert text[0].startswith("index,id,name,layers,heads,ffn,genes,acc,macs")
    assert text[0].endswith("feasible")
    assert len(text) == 3 and '"[2,4]"' in text[1]
