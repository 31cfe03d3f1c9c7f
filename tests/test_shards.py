"""make_shards + ShardSet on a CIFAR-10 subset: round trip, IDs, labels, determinism, resume, CLI errors."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

from picstream.shards import ShardSet, make_shards
from picstream.shards.plan import ExternalSort, sort_key

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("airplane", "cat")
PER_CLASS = 300
SHARD = 128


@pytest.fixture(scope="module")
def corpus(cifar10_dir, tmp_path_factory) -> Path:
    """2 classes x 300 CIFAR-10 JPEGs in class sub-folders (symlinks to the extracted files)."""
    root = tmp_path_factory.mktemp("corpus")
    for c in CLASSES:
        (root / c).mkdir()
        for f in sorted((cifar10_dir / "train" / c).iterdir())[:PER_CLASS]:
            (root / c / f.name).symlink_to(f)
    return root


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    summary = make_shards(corpus, out, shard_size=SHARD, seed=7, progress=False)
    return out, summary


def tar_samples(path: Path) -> dict[int, dict]:
    """Independent reading with tarfile: {id: {ext: (bytes, data offset)}}."""
    samples: dict[int, dict] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            stem, ext = m.name.split(".")
            samples.setdefault(int(stem), {})[ext] = (tar.extractfile(m).read(), m.offset_data)
    return samples


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*")) if p.suffix in (".tar", ".idx")}


def test_round_trip(corpus, built):
    out, summary = built
    n = 2 * PER_CLASS
    assert (summary.inputs, summary.packed, summary.skipped, summary.converted) == (n, n, 0, 0)
    assert summary.num_shards == -(-n // SHARD)
    ss = ShardSet.open(out)
    assert len(ss) == n and ss.num_shards == summary.num_shards and ss.label_names == list(CLASSES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == [] and manifest["seed"] == 7
    seen = []
    for k in range(ss.num_shards):
        first, count = ss.shard_ids(k)
        assert first == k * SHARD and count == min(SHARD, n - first)
        assert manifest["shards"][k]["bytes"] == os.path.getsize(out / f"shard-{k:06d}.tar")
        samples = tar_samples(out / f"shard-{k:06d}.tar")
        assert sorted(samples) == list(range(first, first + count))
        idx = ss.index(k)
        assert idx.dtype == np.int64 and idx.shape == (count, 3)
        for i, (sid, s) in enumerate(sorted(samples.items())):
            assert set(s) == {"jpg", "cls", "json"}
            meta = json.loads(s["json"][0])
            original = (corpus / meta["src"]).read_bytes()
            label = CLASSES.index(meta["src"].split("/")[0])
            assert s["jpg"][0] == original and meta["bytes"] == len(original) and meta["converted"] is None
            assert int(s["cls"][0]) == label
            assert tuple(idx[i]) == (s["jpg"][1], len(original), label)
            assert ss.read(sid) == original and ss.shard_of(sid) == k
            seen.append(meta["src"])
    assert sorted(seen) == sorted(f"{c}/{f.name}" for c in CLASSES for f in (corpus / c).iterdir())
    assert ss.verify() == []


def test_classes_not_sorted(built):
    ss = ShardSet.open(built[0])
    labels = ss.labels(np.arange(len(ss)))
    assert np.bincount(labels).tolist() == [PER_CLASS, PER_CLASS]
    changes = int(np.count_nonzero(np.diff(labels)))
    assert changes > len(ss) // 3  # a random order has ~N/2 label changes, a sorted one has 1
    assert 0.3 < labels[:SHARD].mean() < 0.7


def test_standard_tools_and_webdataset(built):
    out = built[0]
    listing = subprocess.run(["tar", "tf", str(out / "shard-000000.tar")], capture_output=True, text=True,
                             check=True).stdout.split()
    assert listing[:3] == ["000000000000.jpg", "000000000000.cls", "000000000000.json"]
    assert len(listing) == 3 * SHARD
    wds = pytest.importorskip("webdataset")
    urls = [str(p) for p in sorted(out.glob("shard-*.tar"))]
    ss = ShardSet.open(out)
    count = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        sid = int(sample["__key__"])
        assert sid == count and sample["jpg"] == ss.read(sid) and int(sample["cls"]) == ss.labels([sid])[0]
        count += 1
    assert count == len(ss)


def test_iter_range_and_labels(built):
    ss = ShardSet.open(str(built[0]) + "/manifest.json")
    got = list(ss.iter_range(SHARD - 5, 2 * SHARD + 3))
    assert [g[0] for g in got] == list(range(SHARD - 5, 2 * SHARD + 3))
    for sid, data, label in got:
        assert data == ss.read(sid) and label == ss.labels([sid])[0]
    assert [g[0] for g in ss.iter_range(len(ss) - 2, len(ss) + 10)] == [len(ss) - 2, len(ss) - 1]
    with pytest.raises(IndexError):
        ss.read(len(ss))


def test_determinism(corpus, built, tmp_path):
    out, _ = built
    make_shards(corpus, tmp_path / "same", shard_size=SHARD, seed=7, workers=2, progress=False)
    assert shard_bytes(tmp_path / "same") == shard_bytes(out)
    assert (tmp_path / "same" / "manifest.json").read_bytes() == (out / "manifest.json").read_bytes()
    make_shards(corpus, tmp_path / "other", shard_size=SHARD, seed=8, progress=False)
    a, b = ShardSet.open(out), ShardSet.open(tmp_path / "other")
    first_a = [a.read(i) for i in range(20)]
    assert first_a != [b.read(i) for i in range(20)]
    assert sorted(a.read(i) for i in range(len(a))) == sorted(b.read(i) for i in range(len(b)))


def test_verify_detects_corruption(built, tmp_path):
    out = tmp_path / "copy"
    out.mkdir()
    for p in built[0].iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    tar = out / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    (out / "shard-000002.idx").unlink()
    problems = ShardSet.open(out).verify()
    assert len(problems) == 2 and "shard 1" in problems[0] and "shard 2" in problems[1]


def test_list_file_source(corpus, tmp_path):
    files = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.jpg"))[::20]
    (corpus.parent / "list.csv").write_text("path,label\n" + "".join(
        f"{corpus.name}/{f},{f.split('/')[0]}\n" for f in files))
    summary = make_shards(corpus.parent / "list.csv", tmp_path / "o", shard_size=8, progress=False)
    ss = ShardSet.open(tmp_path / "o")
    assert summary.packed == len(files) == len(ss) and ss.label_names == list(CLASSES)
    by_label = {ss.read(i): ss.labels([i])[0] for i in range(len(ss))}
    assert by_label == {(corpus / f).read_bytes(): CLASSES.index(f.split("/")[0]) for f in files}
    (tmp_path / "plain.txt").write_text("".join(f"{corpus / f}\n" for f in files[:5]))
    make_shards(tmp_path / "plain.txt", tmp_path / "p", progress=False)
    ss = ShardSet.open(tmp_path / "p")
    assert len(ss) == 5 and ss.label_names is None and ss.labels(range(5)).tolist() == [-1] * 5


def cli(*args, **kw):
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_shards.py"), *map(str, args)],
                          capture_output=True, text=True, **kw)


def test_resume_after_sigkill(imagenet_sample_dir, tmp_path):
    """SIGKILL the CLI as it renames shard 3's sidecar (shard 3's tar is already in place), re-run it:
    only the missing shards are made, bytes are identical to an uninterrupted build."""
    src = tmp_path / "src"
    src.mkdir()
    for f in sorted(imagenet_sample_dir.iterdir())[:160]:
        (src / f.name).symlink_to(f)
    opts = ["--shard-size", "16", "--resize-short", "64", "--seed", "3"]
    out = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(REPO / "tests" / "crash_runner.py"), "kill",
                             "rename:*/shard-000003.json:1", str(tmp_path / "log"), "--", "make_shards",
                             src, out, *opts, "--quiet"], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "manifest.json").exists() and (out / "shard-000003.tar").exists()
    assert sorted(p.name for p in out.glob("shard-*.json")) == [f"shard-{k:06d}.json" for k in range(3)]
    rerun = cli(src, out, *opts)
    assert rerun.returncode == 0, rerun.stderr
    assert "3 shards resumed" in rerun.stderr.splitlines()[-1]
    make_shards(src, tmp_path / "whole", shard_size=16, resize_short=64, seed=3, progress=False)
    assert shard_bytes(out) == shard_bytes(tmp_path / "whole")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "whole" / "manifest.json").read_bytes()
    assert not list(out.glob("*.tmp"))


def test_cli_fatal_conditions(corpus, tmp_path):
    def one_line_error(result, needle):
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("make_shards: error:") and needle in lines[0], lines

    one_line_error(cli(tmp_path / "missing", tmp_path / "o"), "source not found")
    (tmp_path / "empty").mkdir()
    one_line_error(cli(tmp_path / "empty", tmp_path / "o"), "no inputs found")
    image = next((corpus / "cat").iterdir())
    one_line_error(cli(image, tmp_path / "o"), "neither a folder nor a text file list")
    (tmp_path / "afile").write_text("x")
    one_line_error(cli(corpus, tmp_path / "afile" / "out", "--quiet"), "cannot write to")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"")
    one_line_error(cli(bad, tmp_path / "ob", "--quiet"), "all 1 inputs were skipped")
    ok = cli(bad, tmp_path / "ob", "--quiet", "--seed", "1")  # same output, different options
    one_line_error(ok, "different source or options")


@pytest.mark.parametrize("name, size", [("000000000000.jpg", 0), ("000000000123.json", 511),
                                         ("999999999999.cls", 1), ("000000012345.jpg", 8**11 - 1)])
def test_tar_header_matches_tarfile(name, size):
    from picstream.shards.format import tar_header
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    assert tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


def test_output_inside_source_and_rerun(corpus, tmp_path):
    """OUT inside SRC is not listed as input; re-running a finished command only verifies it."""
    for f in sorted((corpus / "cat").iterdir())[:10]:
        (tmp_path / f.name).symlink_to(f)
    first = make_shards(tmp_path, tmp_path / "shards", shard_size=4, progress=False)
    again = make_shards(tmp_path, tmp_path / "shards", shard_size=4, progress=False)
    assert first.inputs == again.inputs == 10 and first.num_shards == again.num_shards == 3
    assert (again.resumed_shards, again.processed, again.packed) == (3, 0, 10)
    assert ShardSet.open(tmp_path / "shards" / "manifest.json").verify() == []


def _order(names, seed, run=7, fan_in=3):
    """The plan's permutation of `names` (spilled in runs of `run`, merged `fan_in` at a time)."""
    key = str(seed).encode()
    with tempfile.TemporaryDirectory() as d:
        ext = ExternalSort(d, run=run, fan_in=fan_in)
        for i, n in enumerate(names):
            ext.add(sort_key(n, key, i), i)
        return list(ext)


def test_permutation():
    names = [f"c{i % 3}/{i:05d}.jpg" for i in range(3000)]
    digests = [hashlib.blake2b(n.encode(), digest_size=8, key=b"0").digest() for n in names]
    oracle = np.argsort(np.frombuffer(b"".join(digests), dtype=">u8"), kind="stable").tolist()
    p = _order(names, 0)
    assert p == oracle == _order(names, 0, run=10**6)  # spilled + multi-level merge = in memory
    assert p != _order(names, 1)
    grown = _order(names + ["new.jpg"], 0)  # adding an input keeps the others' order
    assert [i for i in grown if i != 3000] == p
    assert _order(["a", "a", "a"], 3, run=1) == [0, 1, 2]  # ties by listing position


def test_symlink_cycle_is_listed_once(corpus, tmp_path):
    (tmp_path / "a").mkdir()
    for f in sorted((corpus / "cat").iterdir())[:3]:
        (tmp_path / "a" / f.name).symlink_to(f)
    (tmp_path / "a" / "loop").symlink_to(tmp_path)  # a cycle back to the root
    summary = make_shards(tmp_path, tmp_path / "out", progress=False)
    assert (summary.inputs, summary.packed) == (3, 3)
