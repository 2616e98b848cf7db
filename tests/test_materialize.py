"""materialize: resharding, every member kept, counts, hostile archives, resume after a kill."""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from simgap.cli import main as cli_main
from simgap.data.keylist import read_key_list
from simgap.data.tars import iter_samples
from simgap.data.tarwrite import write_tar
from simgap.materialize import materialize
from simgap.parallel import Executor, ExecutorError, LocalEngine, ThreadEngine, make_engine
from simgap.select.splitfile import write_split


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
    # Shard 2's 2nd sample is dropped too: the walk stopped at a header it could not read,
    # which may have been that sample's next member (as iter_samples does).
    assert s["corrupt"] == 2 and s["skipped"]["truncated_shard"] >= 1
    assert s["skipped"]["damaged_tail"] == 1  # shard 2; shard 1 counts as truncated
    assert s["kept"] == 4 + 2 + 1 and s["missing"] == 12 - 7
    got = dict(_read_out(tmp_path / "out"))
    assert all(got[k] == m for k, m in samples if k in got)


def test_a_tar_cut_inside_a_header_drops_the_sample_in_progress(tmp_path):
    pool, samples = _pool(tmp_path, n_shards=1, per=3)
    tar_path = pool / "00000.tar"
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    _cut(tar_path, members[-1].offset + 100)  # inside the last member's header
    write_split(tmp_path / "split", [k for k, _ in samples], {"name": "all"})
    s = materialize(tmp_path / "split", str(pool), tmp_path / "out")
    got = dict(_read_out(tmp_path / "out"))
    assert sorted(got) == [k for k, _ in samples[:2]] and s["corrupt"] == 1
    assert [k for k, _ in iter_samples(str(tar_path))] == sorted(got)  # the embed path agrees


_KILL = """
import os, sys
import simgap.materialize.write as sp
from simgap.materialize import materialize
calls = []
real = sp.write_plan_tar
def dying(path, plan):
    calls.append(path)
    if len(calls) == 3:
        os._exit(9)  # killed mid-run: no cleanup, no summary
    real(path, plan)
sp.write_plan_tar = dying
materialize(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=3)
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


def _reference(root, per_class=3):
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"r{c}{i:03d}.jpg").write_bytes(bytes([c, i]) * (50 + i))
    return root


def test_reference_shards_are_resumable_tasks(tmp_path):
    pool, samples = _pool(tmp_path, n_shards=2, per=3)
    write_split(tmp_path / "split", [k for k, _ in samples], {"name": "all"})
    ref = _reference(tmp_path / "ref")
    out = tmp_path / "out"
    args = (tmp_path / "split", str(pool), out)
    s = materialize(*args, reference=ref, shard_size=4, caption_template="a {c}")
    assert s["reference"] == 6 and s["kept"] == 6
    sizes = json.loads((out / "sizes.json").read_text())
    assert {k: v for k, v in sizes.items() if k.startswith("ref-")} == {
        "ref-00000.tar": 4,
        "ref-00001.tar": 2,
    }
    got = dict(_read_out(out))
    assert got["r1002"] == {
        "jpg": bytes([1, 2]) * 52,
        "txt": b"a dog",
        "json": json.dumps({"key": "r1002", "caption": "a dog", "label": 1}).encode(),
    }
    stamps = {p.name: os.stat(p).st_mtime_ns for p in out.glob("ref-*.tar")}
    materialize(*args, reference=ref, shard_size=4, caption_template="a {c}")
    assert {p.name: os.stat(p).st_mtime_ns for p in out.glob("ref-*.tar")} == stamps
    # A changed image rewrites its shard only; a changed template rewrites all.
    (ref / "dog" / "r1002.jpg").write_bytes(b"new bytes")
    holder = next(
        t.name for t in out.glob("ref-*.tar") if any(k == "r1002" for k, _ in iter_samples(str(t)))
    )
    materialize(*args, reference=ref, shard_size=4, caption_template="a {c}")
    for name, stamp in stamps.items():
        assert (os.stat(out / name).st_mtime_ns != stamp) == (name == holder)
    assert dict(_read_out(out))["r1002"]["jpg"] == b"new bytes"
    materialize(*args, reference=ref, shard_size=4)
    assert dict(_read_out(out))["r0000"]["txt"] == b"a photo of a cat"
    # A smaller reference set leaves no stale shard behind for a folder glob to pick up.
    assert s["reference"] == 6
    for p in (ref / "dog").iterdir():
        p.unlink()
    (ref / "dog").rmdir()
    s = materialize(*args, reference=ref, shard_size=4)
    assert s["reference"] == 3 and not (out / "ref-00001.tar").exists()
    assert not (out / ".done" / "ref-00001.json").exists()


def test_reference_key_in_the_split_is_refused(tmp_path):
    pool, samples = _pool(tmp_path, n_shards=1, per=3)
    ref = _reference(tmp_path / "ref")
    write_split(tmp_path / "split", [samples[0][0], "r1001"], {"name": "clash"})
    with pytest.raises(ValueError, match=r"reference key 'r1001' is also in the split"):
        materialize(tmp_path / "split", str(pool), tmp_path / "out", reference=ref)
    assert not (tmp_path / "out" / "sizes.json").exists()


def test_threads_give_the_same_bytes_and_every_done_shard_is_whole(tmp_path):
    pool, samples = _pool(tmp_path, n_shards=4, per=5)
    write_split(tmp_path / "split", [k for k, _ in samples], {"name": "all"})
    ref = _reference(tmp_path / "ref")
    one = materialize(tmp_path / "split", str(pool), tmp_path / "one", reference=ref, shard_size=3)
    out = tmp_path / "threads"
    args = [str(tmp_path / "split"), str(pool), str(out)]
    # Killed mid-run with 3 threads writing: whatever has a done record must be whole.
    r = subprocess.run([sys.executable, "-c", _KILL_THREADS, *args], capture_output=True)
    assert r.returncode == 9, r.stderr.decode()
    for done in (out / ".done").glob("*.json"):
        tar = out / f"{done.stem}.tar"
        assert [k for k, _ in iter_samples(str(tar))], tar  # parses to its end marker
    threads = materialize(
        *args, reference=ref, shard_size=3, executor=Executor(make_engine("thread", 3))
    )
    assert threads == {**one, "shards": one["shards"].replace(str(tmp_path / "one"), str(out))}
    assert {p.name: p.read_bytes() for p in (tmp_path / "one").glob("*.tar")} == {
        p.name: p.read_bytes() for p in out.glob("*.tar")
    }


_KILL_THREADS = """
import os, sys, threading
import simgap.materialize.write as sp
from simgap.materialize import materialize
from simgap.parallel import Executor, ThreadEngine
lock, calls = threading.Lock(), []
real = sp.write_plan_tar
def dying(path, plan):
    with lock:
        calls.append(path)
        if len(calls) == 5:
            os._exit(9)
    real(path, plan)
sp.write_plan_tar = dying
materialize(sys.argv[1], sys.argv[2], sys.argv[3], shard_size=3,
               executor=Executor(ThreadEngine(3)))
"""


def _fails_on_two(x):
    if x == 2:
        raise OSError("disk says no")
    return {"rows": x}


def test_thread_engine_runs_every_task_and_reports_failures():
    outcomes = sorted(ThreadEngine(3).run(lambda x: x * x, list(range(7))))
    assert outcomes == [(i, True, i * i) for i in range(7)]
    with pytest.raises(ExecutorError, match=r"task 2: OSError: disk says no") as e:
        Executor(make_engine("thread", 2), retries=1).map(_fails_on_two, [0, 1, 2, 3])
    assert len(e.value.tracebacks) == 1
    with pytest.raises(ValueError, match="unknown engine"):
        make_engine("threads")


def test_members_larger_than_the_write_buffer(tmp_path):
    # 9 MiB of output: members bigger than the 4 MiB buffer, and writeback started mid-shard.
    big = [(f"b{i}", {"jpg": bytes([i + 1]) * (4_500_000 + i), "txt": b"t"}) for i in range(2)]
    small = [_sample(f"s{i}", i) for i in range(3)]
    write_tar(tmp_path / "pool" / "00000.tar", [small[0], big[0], small[1], big[1], small[2]])
    keys = [k for k, _ in [*big, *small]]
    write_split(tmp_path / "split", keys, {"name": "big"})
    materialize(tmp_path / "split", str(tmp_path / "pool"), tmp_path / "out", shard_size=10)
    write_tar(tmp_path / "want.tar", [small[0], big[0], small[1], big[1], small[2]])
    assert (tmp_path / "out" / "00000.tar").read_bytes() == (tmp_path / "want.tar").read_bytes()


def test_mirrored_shards_drop_a_key_kept_earlier_and_resume(tmp_path):
    pool, samples = _pool(tmp_path, n_shards=3, per=3)
    again = (samples[1][0], {"jpg": b"other bytes", "txt": b"again"})
    write_tar(pool / "00001.tar", [samples[3], again, samples[4], samples[5]])
    write_tar(pool / "00002.tar", [again])  # nothing left once the duplicate is dropped
    write_split(tmp_path / "split", [k for k, _ in samples], {"name": "all"})
    out = tmp_path / "out"
    s = materialize(tmp_path / "split", str(pool), out, executor=Executor(ThreadEngine(2)))
    assert (s["kept"], s["duplicate"], s["output_shards"]) == (6, 2, 2)
    assert _read_out(out) == samples[:6]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    stamps = {p.name: os.stat(p).st_mtime_ns for p in out.glob("*.tar")}
    assert materialize(tmp_path / "split", str(pool), out) == s
    assert {p.name: os.stat(p).st_mtime_ns for p in out.glob("*.tar")} == stamps
    # The same bytes as resharding into shards of the mirrored sizes.
    materialize(tmp_path / "split", str(pool), tmp_path / "re", shard_size=3)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {
        p.name: p.read_bytes() for p in (tmp_path / "re").glob("*.tar")
    }


def _reference_keys(out):
    return [[k for k, _ in iter_samples(str(t))] for t in sorted(out.glob("ref-*.tar"))]


def test_reference_shards_mix_the_classes_in_a_seeded_order(tmp_path):
    """Written class after class, every reference shard held one caption, and so did the batches
    a shuffle buffer draws from it. Now the samples are shuffled across shards by a seed: the same
    seed gives the same bytes, each shard holds several classes, every sample is written once."""
    pool, samples = _pool(tmp_path, n_shards=1, per=2)
    write_split(tmp_path / "split", [samples[0][0]], {"name": "one"})
    ref = _reference(tmp_path / "ref", per_class=20)
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / name
        materialize(
            tmp_path / "split", str(pool), out, reference=ref, shard_size=8, reference_seed=seed
        )
        runs[name] = (out, _reference_keys(out))
    out, shards = runs["a"]
    assert sorted(k for shard in shards for k in shard) == sorted(
        f"r{c}{i:03d}" for c in range(2) for i in range(20)
    )
    assert all({k[1] for k in shard} == {"0", "1"} for shard in shards)  # both classes
    assert [(out / f"ref-{i:05d}.tar").read_bytes() for i in range(len(shards))] == [
        (runs["b"][0] / f"ref-{i:05d}.tar").read_bytes() for i in range(len(shards))
    ]
    assert runs["c"][1] != shards


def _wnid_reference(root, wnids):
    for c, wnid in enumerate(wnids):
        (root / wnid).mkdir(parents=True)
        (root / wnid / f"img{c}.JPEG").write_bytes(bytes([c]) * 60)
    return root


def test_wordnet_id_folders_get_imagenet_class_names_in_captions(tmp_path):
    """An ImageNet-train folder names its classes by WordNet id: the captions once read
    "a photo of a n01440764". They use the class names open_clip ships, in sorted-id order."""
    from open_clip import IMAGENET_CLASSNAMES

    pool, samples = _pool(tmp_path, n_shards=1, per=2)
    write_split(tmp_path / "split", [samples[0][0]], {"name": "one"})
    ref = _wnid_reference(tmp_path / "train", ["n01440764", "n01443537", "n15075141"])
    s = materialize(tmp_path / "split", str(pool), tmp_path / "out", reference=ref)
    assert s["reference"] == 3
    captions = {k: m["txt"].decode() for k, m in _read_out(tmp_path / "out") if k.startswith("img")}
    assert captions == {
        "img0": "a photo of a tench",
        "img1": "a photo of a goldfish",
        "img2": f"a photo of a {IMAGENET_CLASSNAMES[999]}",
    }
    # An id outside the 1000 classes (or a stray folder among ids) has no class name: refused.
    for bad in ("n99999999", "extra"):
        ref2 = _wnid_reference(tmp_path / f"bad-{bad}", ["n01440764", bad])
        with pytest.raises(ValueError, match=f"{bad}.*1000 ImageNet classes"):
            materialize(tmp_path / "split", str(pool), tmp_path / "o2", reference=ref2)
