"""The key rule: keys never contain dots (webdataset cuts a member's key at the first dot)."""

import io

import pytest
import webdataset as wds
from PIL import Image

from simgap.data.sources import fetch_samples, image_folder_items
from simgap.data.tables import TableSpec, table_rows
from simgap.data.tarwrite import write_tar
from simgap.materialize import materialize
from simgap.select.splitfile import write_split


def _jpeg(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, value)).save(buf, "JPEG")
    return buf.getvalue()


def test_a_dotted_reference_image_keeps_its_key_through_materialize_and_webdataset(tmp_path):
    ref = tmp_path / "ref"
    (ref / "cat").mkdir(parents=True)
    (ref / "cat" / "a.b.jpg").write_bytes(_jpeg(10))
    (ref / "cat" / "c.jpg").write_bytes(_jpeg(20))
    write_tar(tmp_path / "pool" / "00000.tar", [("p0", {"jpg": _jpeg(30), "txt": b"a dog"})])
    write_split(tmp_path / "split", ["p0"], {"name": "s"})

    pool = str(tmp_path / "pool")
    summary = materialize(tmp_path / "split", pool, tmp_path / "out", reference=ref)

    assert summary["reference"] == 2
    tars = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))
    # Read back as open_clip_train reads them: webdataset's own grouping by key.
    samples = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}
    assert set(samples) == {"p0", "a_b", "c"}
    assert samples["a_b"]["jpg"] == (ref / "cat" / "a.b.jpg").read_bytes()
    assert samples["a_b"]["txt"] == b"a photo of a cat"


def test_image_folder_keys_map_dots_and_a_clash_is_refused(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "0.5_x.1.png").write_bytes(_jpeg(1))
    assert [k for k, _, _ in image_folder_items(tmp_path)] == ["0_5_x_1"]
    # The store's source locator finds the image again under the mapped key.
    found = fetch_samples(str(tmp_path / "cat" / "0.5_x.1.png"), {"0_5_x_1"})
    assert list(found) == ["0_5_x_1"]
    (tmp_path / "cat" / "0_5_x_1.jpg").write_bytes(_jpeg(2))
    with pytest.raises(ValueError, match="duplicate key '0_5_x_1'"):
        image_folder_items(tmp_path)


def test_table_key_column_maps_dots(tmp_path):
    (tmp_path / "i.jpg").write_bytes(_jpeg(1))
    (tmp_path / "t.csv").write_text("filepath,title,id\ni.jpg,a cat,laion.42\n")
    rows = table_rows(TableSpec(str(tmp_path / "t.csv"), key_column="id"))
    assert [r[0] for r in rows] == ["laion_42"]


def test_writing_a_dotted_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="contains a dot"):
        write_tar(tmp_path / "x.tar", [("a.b", {"jpg": b"x"})])
    assert not (tmp_path / "x.tar").exists()
