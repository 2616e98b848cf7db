"""materialize: resharding, every member kept, counts, hostile archives, resume after a kill."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from simgap.cli import main as cli_main
from simgap.data.tars import iter_samples, write_tar
from simgap.parallel import Executor, LocalEngine
from simgap.splits import materialize, read_key_list, write_split


def _sample(k, i):
    return k, {"jpg": bytes([i % 256]) * (100 + 37 * i), "txt": f"cap {k}".encode(), "json": b"{}"}


def _pool(root, n_shards=3, per=5):
    samples = []
    for s in range(n_shards):
        part = [_sample(f"p{s}{i:03d}", s * per + i) for i in range(per)]
        write_tar(root / "pool" / f"{s:05d}.tar", part)
        samples += part
    return root / "pool", samples


def _read_out(out):
    return [s for t in sorted(out.glob("*.tar")) for s in iter_samples(str(t))]


def test_reshard_keeps_every_member_in_order_and_same_bytes(tmp_path):
    pool, samples = _pool(tmp_path)
    kept = [k for i, (k, _) in enumerate(samples) if i % 3 != 1]  # 10 of 15, across shards
    write_split(tmp_path / "split", [*kept, "p_missing"], {"name": "s"})
    out = tmp_path / "out"
    summary = materialize(tmp_path / "split", str(pool), out, shard_size=4)
    assert (summary["kept"], summary["missing"], summary["corrupt"]) == (10, 1, 0)
    assert json.loads((out / "sizes.json").read_text()) == {
        "00000.tar": 4,
        "00001.tar": 4,
        "00002.tar": 2,
    }
    want = [s for s in samples if s[0] in set(kept)]
    assert _read_out(out) == want  # pool order, every member, same bytes per member
    # The copy by offset writes exactly what write_tar writes for the same samples.
    write_tar(tmp_path / "ref.tar", want[:4])
    assert (out / "00000.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    assert read_key_list(out / "keys.txt") == sorted(kept)
    # Two worker processes give the same bytes as one, per input shard as well.
    out2 = tmp_path / "out2"
    materialize(
        tmp_path / "split", str(pool), out2, shard_size=4, executor=Executor(LocalEngine(2))
    )
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {
        p.name: p.read_bytes() for p in out2.glob("*.tar")
    }
    per_input = materialize(tmp_path / "split", str(pool), tmp_path / "per")
    assert sorted(p.name for p in (tmp_path / "per").glob("*.tar")) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    assert _read_out(tmp_path / "per") == want and per_input["kept"] == 10


def test_key_list_inputs_and_keys_only(tmp_path):
    pool, samples = _pool(tmp_path)
    keys = [k for k, _ in samples[3:9]]
    (tmp_path / "keys.txt").write_text("\n".join(keys) + "\n")
    summary = materialize(tmp_path / "keys.txt", str(pool), tmp_path / "ko", keys_only=True)
    assert summary["kept"] == 6 and not list((tmp_path / "ko").glob("*.tar"))
    assert (tmp_path / "ko" / "keys.txt").read_text() == "".join(f"{k}\n" for k in sorted(keys))
    sources = json.loads((tmp_path / "ko" / "sources.json").read_text())
    assert sources == {str(pool / "00000.tar"): 2, str(pool / "00001.tar"): 4}
    assert (
        cli_main(
            [
                "materialize",
                str(tmp_path / "keys.txt"),
                str(pool),
                "-o",
                str(tmp_path / "c"),
                "--shard-size",
                "5",
            ]
        )
        == 0
    )
    assert [k for k, _ in _read_out(tmp_path / "c")] == keys


def _add(tar, name, data=b"hi", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data) if not attrs else 0
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if not attrs else None)


def test_hostile_members_are_never_written(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    with tarfile.open(pool / "00000.tar", "w") as tar:
        _add(tar, "../escape.txt")
        _add(tar, "/abs.txt")
        _add(tar, "a/../../up.txt")
        _add(tar, "good.txt", b"fine")
        _add(tar, "good.jpg", b"img")
        _add(tar, "link.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tar, "hard.txt", type=tarfile.LNKTYPE, linkname="good.txt")
        _add(tar, "dev.txt", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _add(tar, "fifo.txt", type=tarfile.FIFOTYPE)
    keys = ["good", "../escape", "/abs", "a/../../up", "link", "hard", "dev", "fifo"]
    write_split(tmp_path / "split", keys, {"name": "h"})
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    summary = materialize(tmp_path / "split", str(pool), out, shard_size=10)
    assert summary["kept"] == 1 and summary["skipped"]["unsafe_member"] == 7
    assert summary["missing"] == 7
    assert tarfile.open(out / "00000.tar").getnames() == ["good.jpg", "good.txt"]
    assert [m for _, m in _read_out(out)] == [{"jpg": b"img", "txt": b"fine"}]
    # Nothing was created outside the output folder.
    after = sorted(str(p) for p in tmp_path.rglob("*") if out not in p.parents and p != out)
    assert after == before
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "up.txt").exists()


def _cut(path, at):
    data = path.read_bytes()
    path.write_bytes(data[:at])


def test_corrupt_and_truncated_shards_are_counted(tmp_path):
    pool, samples = _pool(tmp_path, n_shards=3, per=4)
    t1 = pool / "00001.tar"
    with tarfile.open(t1) as tar:
        members = tar.getmembers()
    # Shard 1 cut inside the data of its 3rd sample's first member: 2 samples survive.
    _cut(t1, members[6].offset_data + 10)
    # Shard 2: a garbage header after its 2nd sample: tarfile would stop silently there.
    t2 = pool / "00002.tar"
    with tarfile.open(t2) as tar:
        off = tar.getmembers()[6].offset
    data = bytearray(t2.read_bytes())
    data[off : off + 512] = b"\x07" * 512
    t2.write_bytes(bytes(data))
    write_split(tmp_path / "split", [k for k, _ in samples], {"name": "all"})
    s = materialize(tmp_path / "split", str(pool), tmp_path / "out", shard_size=100)
    assert s["corrupt"] == 1 and s["skipped"]["truncated_shard"] >= 1
    assert s["skipped"]["damaged_tail"] == 1  # shard 2; shard 1 counts as truncated
    assert s["kept"] == 4 + 2 + 2 and s["missing"] == 12 - 8
    got = dict(_read_out(tmp_path / "out"))
    assert all(got[k] == m for k, m in samples if k in got)


_KILL = """
import os, sys
import simgap.splits as sp
calls = []
real = sp.write_plan_tar
def dying(path, plan):
    calls.append(path)
    if len(calls) == 3:
        os._exit(9)  # killed mid-run: no cleanup, no summary
    real(path, plan)
sp.write_plan_tar = dying
sp.materialize(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=3)
"""


def test_resume_after_a_kill_gives_the_same_bytes(tmp_path):
    pool, samples = _pool(tmp_path, n_shards=3, per=5)
    write_split(tmp_path / "split", [k for k, _ in samples], {"name": "all"})
    out = tmp_path / "out"
    args = [str(tmp_path / "split"), str(pool), str(out)]
    r = subprocess.run([sys.executable, "-c", _KILL, *args], capture_output=True)
    assert r.returncode == 9 and not (out / "materialize.json").exists()
    done = sorted(p.name for p in (out / ".done").glob("*.json"))
    assert done == ["00000.json", "00001.json"]
    stamp = os.stat(out / "00000.tar").st_mtime_ns
    summary = materialize(*args, shard_size=3)
    assert summary["kept"] == 15 and os.stat(out / "00000.tar").st_mtime_ns == stamp
    clean = tmp_path / "clean"
    materialize(args[0], args[1], clean, shard_size=3)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {
        p.name: p.read_bytes() for p in clean.glob("*.tar")
    }
    # A changed split invalidates the index and the plans: nothing stale is reused.
    write_split(tmp_path / "split", [k for k, _ in samples[:4]], {"name": "few"})
    assert materialize(*args, shard_size=3)["kept"] == 4
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 1}
    assert [k for k, _ in iter_samples(str(out / "00001.tar"))] == [samples[3][0]]


def test_bad_shard_size(tmp_path):
    pool, samples = _pool(tmp_path, n_shards=1, per=2)
    write_split(tmp_path / "split", [samples[0][0]], {"name": "x"})
    with pytest.raises(ValueError, match="shard size"):
        materialize(tmp_path / "split", str(pool), tmp_path / "o", shard_size=0)
