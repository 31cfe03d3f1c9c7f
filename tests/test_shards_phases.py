"""make_shards in phases (plan / pack / finalize, Dask) and the version 3 manifest (records sidecar)."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from picstream.shards import ShardSet, ShardsError, make_shards
from picstream.shards import records as R
from picstream.shards.build import plan_shards
from picstream.shards.finalize import finalize
from picstream.shards.pack import pack
from picstream.shards.plan import sort_key
from picstream.synthetic import write_corpus

REPO = Path(__file__).resolve().parents[1]
SIZE = 4
SPARE = 1.0  # 4 reserve inputs per unit: no unit of this corpus runs short


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 generated images in 4 class folders plus 4 unusable files (so some shards need reserve)."""
    root = write_corpus(tmp_path_factory.mktemp("corpus") / "src", 10, num_classes=4)
    (root / "square" / "junk.jpg").write_bytes(b"not an image")
    (root / "square" / "empty.jpg").write_bytes(b"")
    (root / "circle" / "cut.jpg").write_bytes((root / "circle" / "00000.jpg").read_bytes()[:300])
    (root / "circle" / "text.jpg").write_bytes(b"hello")
    return root


def files(out: Path, pattern: str = "shard-*") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob(pattern)) if p.is_file()}


def phased(src, out, **kw):
    plan = plan_shards(src, out, shard_size=SIZE, seed=5, spare=SPARE)[0]
    pack(str(out), range(0, 2))
    pack(str(out), range(2, plan.units))
    return plan, finalize(str(out), **kw)


def test_phases_fill_short_shards_from_the_reserve(corpus, tmp_path):
    plan, fin = phased(corpus, tmp_path / "p")
    assert plan.units >= 4 and fin.skipped == 4
    used = [json.loads((tmp_path / "p" / f"shard-{u:06d}.json").read_text())["input_stop"] - SIZE
            for u in range(plan.units)]
    assert any(used), "no unit needed its reserve: the test does not exercise the fillers"
    ss = ShardSet.open(tmp_path / "p")
    assert len(ss) == 40 and ss.verify() == []
    # IDs dense, every input once: the images are the corpus's valid images, each exactly once
    valid = sorted(p.read_bytes() for p in corpus.rglob("[0-9]*.jpg"))
    assert sorted(ss.read(i) for i in range(len(ss))) == valid
    # oracle: shard u = the first SIZE valid of unit u's main inputs then its reserve (permutation
    # order); then the reserve inputs no unit used, in order
    names = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.jpg"))
    order = [names[i] for i in np.argsort([sort_key(n, b"5", i) for i, n in enumerate(names)], kind="stable")]
    bad = {"square/junk.jpg", "square/empty.jpg", "circle/cut.jpg", "circle/text.jpg"}
    reserve, expected, rest = order[plan.units * SIZE:], [], []
    for u in range(plan.units):
        lo, hi = plan.reserve_range(u)
        valid = [n for n in order[u * SIZE:(u + 1) * SIZE] + reserve[lo:hi] if n not in bad]
        expected += valid[:SIZE]
        rest += valid[SIZE:]
    expected += rest
    got = []
    for k in range(ss.num_shards):
        with tarfile.open(tmp_path / "p" / f"shard-{k:06d}.tar") as tar:
            got += [json.loads(tar.extractfile(m).read())["src"] for m in tar if m.name.endswith(".json")]
    assert got == expected


def test_phases_without_skips_equal_the_one_command_build(corpus, tmp_path):
    clean = tmp_path / "clean"
    for p in corpus.rglob("[0-9]*.jpg"):
        (clean / p.parent.name).mkdir(parents=True, exist_ok=True)
        (clean / p.parent.name / p.name).symlink_to(p)
    phased(clean, tmp_path / "p")
    make_shards(clean, tmp_path / "one", shard_size=SIZE, seed=5, progress=False)
    assert files(tmp_path / "p", "shard-*.[ti]*") == files(tmp_path / "one", "shard-*.[ti]*")


def test_dask_pack_is_byte_identical(corpus, tmp_path):
    require("distributed")
    from picstream.shards.cluster import dask_client, pack_on_dask
    plan, _ = phased(corpus, tmp_path / "single")
    plan_shards(corpus, tmp_path / "dask", shard_size=SIZE, seed=5, spare=SPARE)
    with dask_client("local:2") as client:
        summary = pack_on_dask(str(tmp_path / "dask"), range(plan.units), client, per_task=2)
    assert (summary.packed, summary.resumed) == (plan.units, 0)
    finalize(str(tmp_path / "dask"))
    single, dask = files(tmp_path / "single"), files(tmp_path / "dask")
    assert single == dask and len(single) == 3 * ShardSet.open(tmp_path / "dask").num_shards
    assert (tmp_path / "single" / "manifest.json").read_bytes() == (tmp_path / "dask" / "manifest.json").read_bytes()


def test_finalize_refuses_missing_and_foreign_shards(corpus, tmp_path):
    out = tmp_path / "o"
    plan = plan_shards(corpus, out, shard_size=SIZE, seed=5, spare=SPARE)[0]
    pack(str(out), range(0, 1))
    pack(str(out), range(3, plan.units))
    with pytest.raises(ShardsError, match=r"2 of \d+ shards are not packed yet \(--shards 1:3\)"):
        finalize(str(out))
    pack(str(out), range(1, 3))
    side = out / "shard-000002.json"
    side.write_text(side.read_text().replace(plan.fingerprint, "0" * 64))
    with pytest.raises(ShardsError, match="shard 2 .* was packed from another plan"):
        finalize(str(out))
    assert pack(str(out)).packed == 1  # a re-run of pack replaces exactly that shard
    finalize(str(out))
    assert ShardSet.open(out).verify() == []


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), *map(str, args)],
                          capture_output=True, text=True)


def test_cli_phases_and_their_errors(corpus, tmp_path):
    out = tmp_path / "o"
    r = run_cli("finalize", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "has no finished plan" in r.stderr
    assert run_cli("plan", corpus, out, "--shard-size", SIZE, "--seed", 5, "--spare", SPARE).returncode == 0
    r = run_cli("pack", out, "--shards", "x:y")
    assert r.returncode == 2 and r.stderr == "make_shards pack: error: --shards must be A:B (shard numbers), got 'x:y'\n"
    r = run_cli("finalize", out)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not packed yet" in r.stderr
    assert run_cli("pack", out, "--shards", ":3", "--quiet").returncode == 0
    assert run_cli("pack", out, "--shards", "2:", "--quiet").returncode == 0
    r = run_cli("finalize", out, "--records", "sidecar")
    assert r.returncode == 0, r.stderr
    assert ShardSet.open(out).version == 3 and len(ShardSet.open(out)) == 40
    r = run_cli("plan", corpus, out, "--shard-size", 8)
    assert r.returncode == 2 and "holds shards of a different source or options" in r.stderr


def test_plan_spare_too_small_is_one_error(corpus, tmp_path):
    out = tmp_path / "o"
    plan_shards(corpus, out, shard_size=SIZE, seed=5, spare=0)
    with pytest.raises(ShardsError, match=r"shard \d+: only \d of its 4 planned inputs .* larger --spare"):
        pack(str(out))


def test_plan_streams_its_listing(tmp_path, monkeypatch):
    """Plan holds bounded memory end to end: a list source of 4x the names peaks (traced Python
    allocations) like the smaller one, where holding the inputs would cost hundreds of bytes each."""
    import tracemalloc

    from picstream.shards import plan as P
    for name, value in (("RUN", 256), ("FAN_IN", 4), ("BATCH", 64), ("CHUNK", 64)):
        monkeypatch.setattr(P, name, value)  # small runs so that both sizes spill and merge

    def peak(n: int) -> int:
        names = tmp_path / f"list-{n}.txt"
        names.write_text("".join(f"images/{i:09d}.jpg,{i % 7}\n" for i in range(n)))
        tracemalloc.start()
        try:
            plan = plan_shards(names, tmp_path / f"out-{n}", shard_size=16, spare=0.25, tmp=str(tmp_path))[0]
            assert plan.num_inputs == n and plan.label_names == [str(c) for c in range(7)]
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(500)  # first use: imports and caches
    small, large = peak(2000), peak(8000)
    assert large < 1.2 * small and (large - small) / 6000 < 16, (small, large)


class Stop(BaseException):
    """Stands for a kill: nothing below the I/O point runs, no `except Exception` catches it."""


def test_killed_plan_reuses_its_spilled_runs(tmp_path, monkeypatch):
    """Stop a plan at a chosen I/O point of its sort (3 of 11 runs recorded) and run it again: it spills
    only runs 3.., and its plan equals an uninterrupted one. After a change in run 1 of the source, the
    runs from 1 on are made again."""
    from picstream import iopoints
    from picstream.shards import plan as P
    for name, value in (("RUN", 100), ("FAN_IN", 4), ("BATCH", 16)):
        monkeypatch.setattr(P, name, value)
    spill = tmp_path / "spill"

    def run(names: list[str], src: str, out: str, stop_at: int | None = None) -> list[str]:
        """Plan SRC listing `names` into OUT (stopped at the `stop_at`-th runs.json rename); the runs made."""
        made, renames = [], []

        def hook(kind: str, path: str) -> None:
            if kind == "create" and Path(path).name.startswith("run-"):
                made.append(Path(path).name)
            if kind == "rename" and path.endswith(P.RUNS_FILE):
                renames.append(path)
                if len(renames) == stop_at:
                    raise Stop
        (tmp_path / src).write_text("".join(f"{n},{len(n) % 3}\n" for n in names))
        iopoints.set_hook(hook)
        try:
            plan_shards(tmp_path / src, tmp_path / out, shard_size=16, spare=0.25, tmp=str(spill))
        finally:
            iopoints.set_hook(None)
        return made

    names = [f"img/{i:05d}.jpg" for i in range(1050)]
    runs = [f"run-{k:06d}.pkl" for k in range(11)]
    assert run(names, "a.txt", "ref") == runs
    with pytest.raises(Stop):
        run(names, "a.txt", "o", stop_at=4)
    assert run(names, "a.txt", "o") == runs[3:]
    assert files(tmp_path / "o" / "plan", "*") == files(tmp_path / "ref" / "plan", "*")
    assert not list(spill.iterdir())  # finished plans leave no runs behind

    changed = names[:150] + ["img/changed.jpg"] + names[151:]
    assert run(changed, "b.txt", "ref2") == runs
    with pytest.raises(Stop):
        run(names, "b.txt", "o2", stop_at=4)
    assert run(changed, "b.txt", "o2") == runs[1:]
    assert files(tmp_path / "o2" / "plan", "*") == files(tmp_path / "ref2" / "plan", "*")


# Version 3 manifests --------------------------------------------------------------------------------

def test_records_sidecar_round_trip(corpus, tmp_path):
    make_shards(corpus, tmp_path / "v2", shard_size=SIZE, seed=5, progress=False)
    make_shards(corpus, tmp_path / "v3", shard_size=SIZE, seed=5, progress=False, records="sidecar")
    v2, v3 = ShardSet.open(tmp_path / "v2"), ShardSet.open(tmp_path / "v3")
    assert (v2.version, v3.version) == (2, 3) and "shards" not in v3.manifest
    assert files(tmp_path / "v2", "shard-*.[ti]*") == files(tmp_path / "v3", "shard-*.[ti]*")
    assert [v2.shard_record(k) for k in range(v2.num_shards)] == [v3.shard_record(k) for k in range(v3.num_shards)]
    assert [v3.read(i) for i in range(len(v3))] == [v2.read(i) for i in range(len(v2))]
    assert v3.labels(range(len(v3))).tolist() == v2.labels(range(len(v2))).tolist()
    skipped = [json.loads(line) for line in (tmp_path / "v3" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == v2.manifest["skipped"] and v3.manifest["skipped"] == 4
    assert v3.verify() == [] and v2.version == 2  # the old (inline) layout is still what small sets get
    with open(tmp_path / "v3" / R.RECORDS_FILE, "ab") as f:  # bytes no lazy read looks at
        f.write(b"\0")
    assert ShardSet.open(tmp_path / "v3").verify() == [
        f"records: {R.RECORDS_FILE} does not match its sha256 in the manifest"]


def synthetic_set(root: Path, num_shards: int, size: int = 2) -> None:
    """A v3 manifest + records file for `num_shards` shards (no tar files: records only)."""
    root.mkdir()
    body = b"".join(R.record_bytes(dict(first_id=k * size, count=size, bytes=10240, sha256=f"{k:064x}",
                                        index_sha256=f"{k + 1:064x}")) for k in range(num_shards))
    data = R.assemble(body, block=16)
    (root / R.RECORDS_FILE).write_bytes(data)
    (root / "manifest.json").write_text(json.dumps(dict(
        format="picstream-shards", version=3, num_samples=num_shards * size, shard_size=size,
        num_shards=num_shards, label_names=None, records=R.describe(data))))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_records_are_read_lazily_and_checked(tmp_path):
    root = tmp_path / "big"
    synthetic_set(root, 1000)
    block0 = R.HEADER.size + 32 * 63  # the records start after the header and 63 block hashes
    flip(root / R.RECORDS_FILE, block0 + 16 * R.RECORD.size * 40 + 100)  # damage block 40 only
    ss = ShardSet.open(root)  # header, table and the last block
    assert ss.shard_record(5)["sha256"] == f"{5:064x}" and ss.shard_ids(999) == (1998, 2)
    assert sorted(ss._shards._cache) == [0, 62]  # only the blocks asked for were read
    with pytest.raises(ShardsError, match="block 40 .* does not match its checksum"):
        ss.shard_record(16 * 40 + 3)
    flip(root / R.RECORDS_FILE, R.HEADER.size + 5)  # the table
    with pytest.raises(ShardsError, match="do not match their sha256 in the manifest"):
        ShardSet.open(root)
    (root / R.RECORDS_FILE).unlink()
    with pytest.raises(ShardsError, match="shard records .* are missing"):
        ShardSet.open(root)


# Kill and resume each phase ---------------------------------------------------------------------------

PHASES = ("plan", "pack", "finalize")


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "o"
    plan, _ = phased(corpus, out)
    return out, plan


def run_phase(phase: str, corpus: Path, out: Path, crash: str | None = None, log: Path | None = None):
    args = {"plan": ["plan", corpus, out, "--shard-size", SIZE, "--seed", 5, "--spare", SPARE],
            "pack": ["pack", out, "--shards", "0:2"] if crash else ["pack", out],
            "finalize": ["finalize", out]}[phase]
    if crash is None:
        return run_cli(*args, "--quiet")
    return subprocess.run([sys.executable, str(REPO / "tests" / "crash_runner.py"), "kill", crash, str(log),
                           "--", "make_shards", *map(str, args), "--quiet"], capture_output=True, text=True)


@pytest.mark.parametrize("phase, point", [
    ("plan", "rename:*/plan/main-000002.pkl:1"), ("plan", "rename:*/plan/plan.json:1"),
    ("pack", "rename:*/shard-000001.tar:1"), ("pack", "rename:*/shard-000001.json:1"),
    ("finalize", "rename:*/shard-{m1:06d}.json:1"), ("finalize", "rename:*/manifest.json:1")])
def test_kill_and_resume_each_phase(corpus, reference, tmp_path, phase, point):
    """SIGKILL at a chosen I/O point of one phase, run it again: the result is the uninterrupted one."""
    ref, plan = reference
    out = tmp_path / "o"
    for before in PHASES[:PHASES.index(phase)]:
        assert run_phase(before, corpus, out).returncode == 0
    killed = run_phase(phase, corpus, out, crash=point.format(m1=plan.units + 1), log=tmp_path / "log")
    assert killed.returncode == -9, killed.stderr
    assert not (out / "manifest.json").exists()
    for again in PHASES[PHASES.index(phase):]:
        result = run_phase(again, corpus, out)
        assert result.returncode == 0, result.stderr
    assert files(out) == files(ref) and files(out / "plan", "*") == files(ref / "plan", "*")
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    assert not list(out.rglob("*.tmp"))
