"""Integrity end to end on real shards: per-sample checksums (format v2, v1 still readable), damaged
bytes never reaching the model, the retry policy, `picstream-verify`, unreadable windows, and the
manifest's own digest (a damaged manifest refused, an old one read unverified)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from picstream.loader import WindowLoader
from picstream.loader.cache import cache_name
from picstream.loader.stream import UnreadableStream
from picstream.scheduler import SlidingWindowScheduler
from picstream.shards import ShardSet, make_shards
from picstream.shards.format import DamagedData, manifest_digest, sha256_hex
from picstream.shards.reader import DamagedManifest
from picstream.shards.retry import RetryPolicy, RetryStats, Unavailable, retryable


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """100 generated JPEGs (~1-3 KB) in 13 shards of 8."""
    src = tmp_path_factory.mktemp("integrity-src")
    rng = np.random.default_rng(5)
    for i in range(100):
        pixels = rng.integers(0, 256, (20 + i % 9, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(src / f"{i:03d}.jpg", quality=85)
    out = tmp_path_factory.mktemp("integrity-shards")
    make_shards(src, out, shard_size=8, seed=1, progress=False)
    return out


def copy_of(root: Path, dest: Path) -> Path:
    shutil.copytree(root, dest)
    return dest


def flip_every_4k(root: Path, seed: int) -> set[int]:
    """Flip one byte per 4 KiB (at seeded offsets) in every tar; the IDs whose image bytes were hit."""
    ss = ShardSet.open(root)
    rng = np.random.default_rng(seed)
    damaged = set()
    for k in range(ss.num_shards):
        path = root / ss.shard_record(k)["name"]
        data = bytearray(path.read_bytes())
        flips = [int(b + rng.integers(0, 4096)) for b in range(0, len(data) - 4096, 4096)]
        for at in flips:
            data[at] ^= 1 << int(rng.integers(0, 8))
        path.write_bytes(bytes(data))
        for i, (off, size, _) in enumerate(ss.index(k).tolist()):
            if any(off <= at < off + size for at in flips):
                damaged.add(k * ss.shard_size + i)
    return damaged


def test_flipped_bytes_in_a_local_shard_never_reach_the_model(clean, tmp_path):
    bad_root = copy_of(clean, tmp_path / "bad")
    damaged = flip_every_4k(bad_root, seed=0)
    good, bad = ShardSet.open(clean), ShardSet.open(bad_root)
    assert 0 < len(damaged) < len(bad) // 2

    detected = set()
    for i in range(len(bad)):
        try:
            assert bad.read(i) == good.read(i)
        except DamagedData:
            detected.add(i)
    assert detected == damaged                                 # every damaged sample, nothing else
    problems = bad.verify()
    listed = {int(i) for line in problems if "damaged samples" in line
              for i in line.split("damaged samples: [")[1][:-1].split(", ")}
    assert listed == damaged and len(problems) == bad.num_shards

    sched = SlidingWindowScheduler(len(bad), 32, 8, seed=2)
    kw = dict(image_size=16, num_steps=25, seed=3, workers=0)   # two passes over the data
    got = list(WindowLoader(bad, sched, 8, **kw))
    oracle = WindowLoader(good, sched, 8, **kw).dataset.maker   # the clean source's bytes
    assert all(len(b) == 8 for b in got)
    for b in got:
        assert not damaged & set(b.ids.tolist())
        same = oracle.make(b.step, b.positions.numpy(), b.ids.numpy())
        assert torch.equal(b.images, same.images)             # pixel-identical to the clean source
    hit = sum(i in damaged for i in sched.ids_at(0, 25 * 8).tolist())
    assert set().union(*(b.skip_reasons for b in got)) == {"damaged"}
    assert sum(b.skip_reasons.get("damaged", 0) for b in got) >= hit > 0


def as_v1(root: Path, dest: Path) -> Path:
    """A format-1 copy: index rows without the checksum column, manifest version 1 (no digest)."""
    shutil.copytree(root, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    del manifest["digest"]
    for s in manifest["shards"]:
        rows = np.fromfile(dest / s["index"], dtype="<i8").reshape(-1, 4)[:, :3]
        (dest / s["index"]).write_bytes(rows.tobytes())
        s["index_sha256"] = sha256_hex(rows.tobytes())
    manifest["version"] = 1
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_version_1_shard_sets_stay_readable(clean, tmp_path):
    v2, v1 = ShardSet.open(clean), ShardSet.open(as_v1(clean, tmp_path / "v1"))
    assert (v1.version, v2.version) == (1, 2)
    assert v1.checksums(0) is None and v2.checksums(0).shape == (8,)
    assert np.array_equal(v1.index(3), v2.index(3))
    assert [v1.read(i) for i in range(len(v1))] == [v2.read(i) for i in range(len(v2))]
    sched = SlidingWindowScheduler(len(v1), 32, 8, seed=0)
    a = list(WindowLoader(v1, sched, 8, image_size=16, num_steps=4, workers=0))
    b = list(WindowLoader(v2, sched, 8, image_size=16, num_steps=4, workers=0))
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))


def test_damaged_index_is_detected_and_its_samples_skipped(clean, tmp_path):
    root = copy_of(clean, tmp_path / "c")
    idx = root / "shard-000002.idx"
    data = bytearray(idx.read_bytes())
    data[9] ^= 0x10                                            # the first sample's size
    idx.write_bytes(bytes(data))
    ss = ShardSet.open(root)
    with pytest.raises(DamagedData, match="index of shard 2"):
        ss.index(2)
    sched = SlidingWindowScheduler(len(ss), 32, 8, seed=0)     # window 0 = shards 0..3
    got = list(WindowLoader(ss, sched, 8, image_size=8, num_steps=4, workers=0))
    assert all(len(b) == 8 for b in got) and not any(16 <= i < 24 for b in got for i in b.ids.tolist())
    assert set().union(*(b.skip_reasons for b in got)) == {"damaged"}


def test_an_all_missing_window_is_one_clear_error(clean, tmp_path):
    root = copy_of(clean, tmp_path / "gone")
    for tar in root.glob("*.tar"):
        tar.unlink()
    ss = ShardSet.open(root)
    loader = WindowLoader(ss, SlidingWindowScheduler(len(ss), 32, 8, seed=0), 8, image_size=8,
                          num_steps=2, workers=0, on_missing="skip")
    with pytest.raises(UnreadableStream, match=r"no readable sample for step 0: .*\d+ missing"):
        list(loader)


class Flaky:
    """Fails the first `n` calls with `exc`, then returns "ok"."""

    def __init__(self, n: int, exc: Exception):
        self.n, self.exc, self.calls = n, exc, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.n:
            raise self.exc
        return "ok"


class Status(Exception):
    def __init__(self, status: int):
        super().__init__(f"HTTP {status}")
        self.status = status


@pytest.mark.parametrize("exc, expected", [
    (Status(503), True), (Status(500), True), (Status(408), True), (Status(429), True),
    (Status(403), False), (Status(416), False), (FileNotFoundError("404"), False),
    (PermissionError(), False), (ConnectionResetError(), True), (TimeoutError(), True),
    (DamagedData("short"), True), (ValueError("a bug"), False)])
def test_what_is_retried(exc, expected):
    assert retryable(exc) is expected


def test_retry_policy_counts_and_gives_up():
    stats = RetryStats()
    policy = RetryPolicy(attempts=4, base=0.0)
    flaky = Flaky(3, ConnectionResetError("cut"))
    assert policy.call(flaky, what="x", kind="shard", stats=stats) == "ok"
    assert flaky.calls == 4 and stats.drain() == {"shard": 3} and stats.drain() == {}
    with pytest.raises(Unavailable, match="x: 4 tries failed, last: ConnectionResetError"):
        policy.call(Flaky(4, ConnectionResetError("cut")), what="x", kind="shard", stats=stats)
    gone = Flaky(1, FileNotFoundError("404"))
    with pytest.raises(FileNotFoundError):
        policy.call(gone, what="x", kind="index", stats=stats)
    assert gone.calls == 1 and stats.drain() == {"shard": 3}
    bounded = Flaky(100, ConnectionResetError("cut"))
    with pytest.raises(Unavailable):   # every wait would pass max_wait: no retry at all
        RetryPolicy(attempts=100, base=10.0, max_wait=1e-9).call(bounded, what="x", kind="k")
    assert bounded.calls == 1


def verify_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "picstream.verify", "--quiet", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_verify_cli_reports_damage_and_repairs_a_cache(clean, tmp_path):
    ok = verify_cli(clean)
    assert ok.returncode == 0 and ok.stdout.strip() == "0 of 13 shards damaged"

    root = copy_of(clean, tmp_path / "bad")
    damaged = flip_every_4k(root, seed=1)
    (root / "shard-000004.idx").unlink()
    result = verify_cli(root)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "13 of 13 shards damaged" and "shard 4: index of shard 4" in result.stdout
    assert sum(line.count(",") + 1 for line in lines if "damaged samples" in line) == len(damaged - set(range(32, 40)))

    ss, cache = ShardSet.open(clean), tmp_path / "cache"
    cache.mkdir()
    good_entry, bad_entry = (cache / cache_name(ss.shard_record(k)) for k in (0, 1))
    shutil.copy(clean / "shard-000000.tar", good_entry)
    shutil.copy(root / "shard-000001.tar", bad_entry)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = cache / f"{cache_name(ss.shard_record(2))}.{dead}.part"
    stale.write_bytes(b"partial")
    repaired = verify_cli(clean, "--repair-cache", cache)
    assert repaired.returncode == 1 and "2 cache files removed" in repaired.stdout
    assert good_entry.exists() and not bad_entry.exists() and not stale.exists()
    assert verify_cli(clean, "--repair-cache", cache).returncode == 0

    missing = verify_cli(tmp_path / "nowhere")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"picstream-verify: error: shard manifest not found: {tmp_path / 'nowhere' / 'manifest.json'}"]


def test_make_shards_workers_die_with_their_parent(clean, tmp_path):
    """SIGKILL make_shards mid-run: its worker processes end too (Linux parent-death signal)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(src / f"{i}.png")
    proc = subprocess.Popen([sys.executable, "-m", "picstream.shards.cli", str(src), str(tmp_path / "o"),
                             "--workers", "2", "--quiet"], stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    while len(workers) < 2 and proc.poll() is None:
        workers = {pid for pid in children(proc.pid) if b"spawn_main" in cmdline(pid)}
        time.sleep(0.01)
    assert proc.poll() is None, "make_shards ended before its workers could be seen"
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60   # only bounds a failure: the kernel ends them at once
    while any(running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(running(pid) for pid in workers)


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def damage_manifest(root: Path, old: str, new: str) -> Path:
    """Replace the first `old` in root's manifest.json by `new` (still valid JSON); its path."""
    path = root / "manifest.json"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def test_manifest_digest_is_of_its_canonical_content(clean):
    manifest = json.loads((clean / "manifest.json").read_text())
    assert manifest["digest"] == manifest_digest(manifest) == manifest_digest(json.loads(json.dumps(manifest)))
    assert manifest_digest({**manifest, "num_samples": 99}) != manifest["digest"]
    assert ShardSet.open(clean).digest == manifest["digest"]


@pytest.mark.parametrize("old, new", [('"shard-000005.tar"', '"shardx000005.tar"'), ('"count": 8', '"count": 7'),
                                      ('"digest"', '"digesu"')], ids=["name", "count", "digest-key"])
def test_a_manifest_damaged_on_disk_is_refused_and_verify_names_it(clean, tmp_path, old, new):
    root = copy_of(clean, tmp_path / "bad")
    path = damage_manifest(root, old, new)
    why = "has a damaged digest key ('digesu')" if "digest" in old else "does not match its digest"
    line = f"shard manifest {path} {why}: it is damaged; restore it (or run make_shards finalize again)"
    with pytest.raises(DamagedManifest) as err:
        ShardSet.open(root)
    assert str(err.value) == line
    result = verify_cli(root)
    assert result.returncode == 1 and result.stdout.strip().splitlines() == [f"manifest: {line}"]
    ok = verify_cli(clean)
    digest = json.loads((clean / "manifest.json").read_text())["digest"]
    assert ok.returncode == 0 and f"manifest of {clean} matches its digest {digest}" in ok.stderr


def test_a_manifest_without_digest_is_read_unverified_with_one_warning(clean, tmp_path, caplog):
    root = copy_of(clean, tmp_path / "old")
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["digest"]
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    with caplog.at_level("WARNING"):
        ss = ShardSet.open(root)
    assert ss.digest is None and len(ss) == len(ShardSet.open(clean))
    assert [r.getMessage() for r in caplog.records] == [
        f"shard manifest {root / 'manifest.json'} has no digest (written by an older make_shards): its content "
        "is unverified"]
    result = verify_cli(root)
    assert result.returncode == 0 and "is unverified" in result.stderr
