from simgap.parallel import Progress


def test_count_lines_throttle_and_say_eta_only_with_a_total():
    lines = []
    p = Progress("scan", lines.append, every_s=3600)
    p.count(5, 10)  # the first line always comes
    p.count(6, 10)  # within every_s: silent
    p.count(10, 10)  # the end always comes
    assert len(lines) == 2
    assert lines[0].startswith("scan: 5/10 rows, ") and "rows/s, ETA " in lines[0]
    assert lines[1].startswith("scan: 10/10 rows, ") and lines[1].endswith("ETA 0s")
    q = Progress("evaluate photo", lines.append, unit="images", every_s=0)
    q.count(3)
    assert lines[-1].startswith("evaluate photo: 3 images, ") and "ETA" not in lines[-1]


def test_on_done_counts_records_rows_per_task():
    lines = []
    p = Progress("embed pool", lines.append)
    p(1, 2, {"rows": 7})
    p(2, 2, {"rows": 5})
    assert lines[0].startswith("embed pool: 1/2 shards, 7 rows, ")
    assert lines[1].startswith("embed pool: 2/2 shards, 12 rows, ")
    assert p.rows == 12
    silent = Progress("x", None)
    silent(1, 1, {"rows": 3})
    silent.count(1, 1)
    assert silent.rows == 3
