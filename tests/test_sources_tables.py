"""Sources beyond tar shards: csv/tsv/parquet tables, fsspec URLs, CLIP_benchmark wds folders."""

import io
from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from simgap.data.clip_benchmark import write_wds
from simgap.data.sources import fetch_samples, image_folder_items, shard_tasks
from simgap.data.tables import TableSpec
from simgap.data.tars import ShardError, expand_shards, iter_samples
from simgap.data.tarwrite import write_tar
from simgap.embed import embed


def _png(color):
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(5):
        (tmp_path / "img" / f"im{i}.png").write_bytes(_png((i * 50, 0, 0)))
    return tmp_path


def _records(spec, shard_size=100):
    skipped = Counter()
    out = [r for t in shard_tasks(spec, shard_size) for r in t.records(skipped)]
    return out, skipped


def test_open_clip_tsv_convention_with_derived_keys(images):
    # open_clip's defaults: tab separator, columns filepath and title; paths relative to the table.
    rows = "".join(f"img/im{i}.png\ta photo number {i}\n" for i in range(5))
    (images / "train.csv").write_text("filepath\ttitle\n" + rows)
    records, skipped = _records(str(images / "train.csv"), shard_size=2)
    assert [k for k, _, _ in records] == [f"{i:09d}" for i in range(5)]
    assert records[3][1] == _png((150, 0, 0))
    assert records[3][2]["caption"] == "a photo number 3"
    assert records[3][2]["path"] == str(images / "img" / "im3.png")
    assert len(shard_tasks(str(images / "train.csv"), 2)) == 3 and not skipped


def test_comma_csv_with_key_column_and_custom_names(images):
    (images / "t.csv").write_text(
        'id,image,text\n007,img/im1.png,"one, with comma"\n002,img/im2.png,two\n'
    )
    spec = TableSpec(str(images / "t.csv"), img_key="image", caption_key="text", key_column="id")
    records, _ = _records(spec.locator())
    # Keys are kept as text: the leading zeros of "007" survive.
    assert [(k, m["caption"]) for k, _, m in records] == [
        ("007", "one, with comma"),
        ("002", "two"),
    ]
    assert TableSpec.from_locator(spec.locator()) == spec


def test_parquet_table_and_missing_files_counted(images):
    pq.write_table(
        pa.table(
            {"filepath": ["img/im0.png", "img/gone.png", "img/im4.png"], "title": list("abc")}
        ),
        images / "t.parquet",
    )
    records, skipped = _records(str(images / "t.parquet"))
    assert [k for k, _, _ in records] == ["000000000", "000000002"]
    assert skipped == {"unreadable_file": 1}


def test_table_errors_name_file_and_problem(images):
    (images / "dup.tsv").write_text(
        "k\tfilepath\ttitle\na\timg/im0.png\tx\nb\timg/im1.png\ty\na\ti\tz\n"
    )
    with pytest.raises(ValueError, match=r"dup.tsv: duplicate key 'a' at rows 0 and 2"):
        shard_tasks(TableSpec(str(images / "dup.tsv"), key_column="k").locator())
    with pytest.raises(ValueError, match=r"dup.tsv: no column 'url'.*\['k', 'filepath', 'title'\]"):
        shard_tasks(TableSpec(str(images / "dup.tsv"), img_key="url").locator())
    with pytest.raises(FileNotFoundError, match="missing.csv: table not found"):
        shard_tasks(str(images / "missing.csv"))
    with pytest.raises(ValueError, match="unknown table options"):
        shard_tasks(str(images / "dup.tsv") + "#colour=red")


def test_table_embed_and_fetch_samples_find_rows_again(images, checkpoint, tmp_path):
    (images / "t.tsv").write_text(
        "filepath\ttitle\n" + "".join(f"img/im{i}.png\tcap {i}\n" for i in range(5))
    )
    store = embed(str(images / "t.tsv"), tmp_path / "store", checkpoint, shard_size=3, text=True)
    table = store.keys_table().to_pydict()
    assert table["key"] == [f"{i:09d}" for i in range(5)]
    assert store.has_text and store.read_text_emb("00001").shape == (2, store.dim)
    source = table["source"][4]
    got = fetch_samples(source, {"000000004", "000000001", "nope"})
    assert sorted(got) == ["000000001", "000000004"]
    assert got["000000004"] == {"png": _png((200, 0, 0)), "txt": b"cap 4"}


def test_image_folder_duplicate_key_names_both_files(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "same.png").write_bytes(_png((1, 2, 3)))
    with pytest.raises(ValueError, match=r"duplicate key 'same'.*a/same.png and .*b/same.png"):
        image_folder_items(tmp_path)


def test_fsspec_urls_file_and_memory(tmp_path):
    samples = [(f"u{i}", {"png": _png((i, i, i)), "txt": b"t"}) for i in range(3)]
    write_tar(tmp_path / "00000.tar", samples)
    url = f"file://{tmp_path}/00000.tar"
    assert [k for k, _ in iter_samples(url)] == ["u0", "u1", "u2"]
    assert expand_shards(f"file://{tmp_path}") == [url]
    with fsspec.open("memory://pool/00001.tar", "wb") as f:
        f.write((tmp_path / "00000.tar").read_bytes())
    tasks = shard_tasks("memory://pool/*.tar")
    assert [t.tar for t in tasks] == ["memory:///pool/00001.tar"]  # fsspec's canonical form
    records = list(tasks[0].records(Counter()))
    assert [r[0] for r in records] == ["u0", "u1", "u2"] and records[0][2]["caption"] == "t"
    assert tasks[0].fingerprint() == tasks[0].fingerprint()
    assert sorted(fetch_samples("memory://pool/00001.tar", {"u1"})) == ["u1"]
    with pytest.raises(ShardError, match="matches no .tar"):
        expand_shards("memory://nothing/*.tar")


def test_clip_benchmark_wds_folder_is_a_labelled_source(tmp_path, checkpoint):
    samples = [(f"s{i:03d}", "png", _png((i * 30, 9, 9)), i % 3) for i in range(7)]
    write_wds(tmp_path / "wds", ["cat", "dog", "car"], ["a photo of a {c}."], samples, n_shards=2)
    tasks = shard_tasks(tmp_path / "wds")
    assert [t.tar for t in tasks] == [str(tmp_path / "wds" / "test" / f"{i}.tar") for i in (0, 1)]
    store = embed(tmp_path / "wds", tmp_path / "store", checkpoint)
    table = store.keys_table().to_pydict()
    assert table["key"] == [s[0] for s in samples]
    assert table["label"] == [s[3] for s in samples]
    # A sample without its .cls label is skipped and counted, not embedded unlabelled.
    write_tar(
        tmp_path / "wds" / "test" / "1.tar",
        [("s100", {"png": _png((1, 1, 1))}), ("s101", {"png": _png((2, 2, 2)), "cls": b"1"})],
    )
    store = embed(tmp_path / "wds", tmp_path / "store", checkpoint)
    assert store.shards[1].skipped == {"missing_label": 1}
    assert store.read_keys("00001").column("key").to_pylist() == ["s101"]


def test_cli_table_flags_and_one_line_error(images, checkpoint, tmp_path, capsys):
    from simgap.cli import main
    from simgap.store import open_store

    (images / "t.csv").write_text("img,cap\nimg/im0.png,zero\nimg/im1.png,one\n")
    out = str(tmp_path / "s")
    flags = ["--checkpoint", checkpoint.checkpoint, "--csv-caption-key", "cap"]
    assert main(["embed", str(images / "t.csv"), "-o", out, *flags, "--csv-img-key", "img"]) == 0
    store = open_store(out)
    assert store.keys_table().column("caption").to_pylist() == ["zero", "one"]
    assert main(["embed", str(images / "t.csv"), "-o", out, *flags]) == 2
    assert "no column 'filepath'" in capsys.readouterr().err
