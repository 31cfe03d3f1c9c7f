"""WindowLoader over real HTTP on 127.0.0.1: whole-shard cache, prefetch, retries, fork safety, missing
shards remembered across workers, stale partial downloads."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from picstream.loader import WindowLoader
from picstream.scheduler import SlidingWindowScheduler
from picstream.shards import ShardSet, ShardsError, make_shards
from picstream.shards import records as R
from picstream.shards.reader import DamagedManifest
from picstream.shards.retry import RetryPolicy

from test_shards_phases import flip, synthetic_set

# A static file server in its own process that logs every GET and can fail requests:
# argv = root, log file, number of 503 answers to give first for each .tar, file names to 404.
SERVER = r"""
import collections, functools, sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
root, log, fail_first, missing = sys.argv[1], sys.argv[2], int(sys.argv[3]), set(sys.argv[4:])
seen = collections.Counter()

class Handler(SimpleHTTPRequestHandler):
    def do_GET(self):
        with open(log, "a") as f:
            f.write(self.path + "\n")
        name = self.path.rsplit("/", 1)[-1]
        if name in missing:
            return self.send_error(404)
        if name.endswith(".tar"):
            seen[name] += 1
            if seen[name] <= fail_first:
                return self.send_error(503)
        return super().do_GET()

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """100 small generated JPEGs (labelled by folder) in 13 shards of 8."""
    src = tmp_path_factory.mktemp("remote-src")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (src / c).mkdir()
        for i in range(50):
            pixels = rng.integers(0, 256, (24 + i % 7, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(src / c / f"{i:03d}.jpg", quality=90)
    out = tmp_path_factory.mktemp("remote-shards")
    make_shards(src, out, shard_size=8, seed=3, progress=False)
    return out


class Server:
    def __init__(self, root: Path, log: Path, fail_first: int = 0, missing=()):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(log),
                                      str(fail_first), *missing], stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.proc.stdout.readline().strip()}"

    def tar_requests(self) -> list[str]:
        lines = self.log.read_text().split() if self.log.exists() else []
        return [p.rsplit("/", 1)[-1] for p in lines if p.endswith(".tar")]

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server(shard_dir, tmp_path):
    servers = []

    def start(**kw) -> Server:
        servers.append(Server(shard_dir, tmp_path / f"log{len(servers)}", **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def run(loader) -> list:
    with loader:
        return list(loader)


def cache_tars(cache: Path) -> set[str]:
    return {p.name.split("-", 1)[1] for p in cache.iterdir() if p.name.endswith(".tar")}


def test_remote_batches_equal_local_and_each_shard_is_fetched_once(shard_dir, server, tmp_path):
    srv = server()
    local, remote = ShardSet.open(shard_dir), ShardSet.open(srv.url + "/manifest.json")
    sched = SlidingWindowScheduler(len(local), 24, 8, seed=0)
    kw = dict(image_size=16, num_steps=20, seed=2)
    expected = run(WindowLoader(local, sched, 6, workers=0, **kw))
    got = run(WindowLoader(remote, sched, 6, workers=2, cache_dir=str(tmp_path / "c"), **kw))
    assert [b.step for b in got] == list(range(20))
    for x, y in zip(expected, got):
        assert torch.equal(x.images, y.images) and torch.equal(x.ids, y.ids)
        assert torch.equal(x.labels, y.labels) and y.skipped == 0
    requests = srv.tar_requests()
    assert len(requests) == len(set(requests))                 # whole shards, each once
    assert len(requests) <= remote.num_shards


def test_reads_only_the_window_and_the_next_stride(shard_dir, server, tmp_path):
    srv = server()
    remote = ShardSet.open(srv.url + "/manifest.json")
    sched = SlidingWindowScheduler(len(remote), 24, 8, seed=1)   # window: 3 shards, stride: 1
    cache = tmp_path / "c"
    run(WindowLoader(remote, sched, 4, image_size=8, workers=0, num_steps=1, cache_dir=str(cache)))
    wanted = {remote.shard_url(int(k)).rsplit("/", 1)[-1]
              for k in np.union1d(sched.shards_of_window(0, 8), sched.shards_of_next_stride(0, 8))}
    assert set(srv.tar_requests()) == wanted == cache_tars(cache)


def test_transient_errors_are_retried_and_counted(shard_dir, server, tmp_path):
    srv = server(fail_first=1)
    remote = ShardSet.open(srv.url + "/manifest.json")
    sched = SlidingWindowScheduler(len(remote), 16, 8, seed=0)
    got = run(WindowLoader(remote, sched, 8, image_size=8, workers=0, num_steps=3,
                           cache_dir=str(tmp_path / "c")))
    assert sum(b.skipped for b in got) == 0 and sum(len(b) for b in got) == 24
    requests = srv.tar_requests()
    assert set(requests) and all(requests.count(n) == 2 for n in set(requests))
    counted = sum(b.retries.get("shard", 0) for b in got) + remote.retry_stats.drain().get("shard", 0)
    assert counted == len(set(requests))              # one retry per 503, all counted


def test_missing_shard_is_skipped_once_and_refilled(shard_dir, server, tmp_path):
    local = ShardSet.open(shard_dir)
    gone = local.shard_url(1).rsplit("/", 1)[-1]
    srv = server(missing=[gone])
    remote = ShardSet.open(srv.url + "/manifest.json")
    sched = SlidingWindowScheduler(len(remote), 32, 8, seed=0)   # window 0 = shards 0..3
    got = run(WindowLoader(remote, sched, 8, image_size=8, workers=0, num_steps=4,
                           cache_dir=str(tmp_path / "c"), on_missing="skip"))
    assert all(len(b) == 8 for b in got)                      # every slot refilled
    assert {r for b in got for r in b.skip_reasons} == {"missing"}
    assert sum(b.skipped for b in got) >= 8
    assert not any(8 <= i < 16 for b in got for i in b.ids.tolist())
    assert srv.tar_requests().count(gone) == 1                # one 404, remembered for the run


def test_cache_is_bounded_to_the_protected_shards(shard_dir, server, tmp_path):
    srv = server()
    remote = ShardSet.open(srv.url + "/manifest.json")
    sched = SlidingWindowScheduler(len(remote), 16, 8, seed=0)   # 2 (+1 or 2 straddling) shards
    cache = tmp_path / "c"
    loader = WindowLoader(remote, sched, 8, image_size=8, workers=0, num_steps=30,
                          cache_dir=str(cache), cache_bytes=1)
    peak = 0
    with loader:
        for _ in loader:
            peak = max(peak, len(cache_tars(cache)))
    assert peak <= 5                                          # never the whole set of 13
    assert len(srv.tar_requests()) > remote.num_shards        # evicted shards come back later


def test_no_threads_before_fork_and_forked_workers_work(shard_dir, server, tmp_path):
    srv = server()
    remote = ShardSet.open(srv.url + "/manifest.json")
    remote.index(0)
    before = {t.ident for t in threading.enumerate()}
    sched = SlidingWindowScheduler(len(remote), 24, 8, seed=0)
    loader = WindowLoader(remote, sched, 8, image_size=8, workers=2, num_steps=6)
    assert {t.ident for t in threading.enumerate()} == before     # construction starts nothing
    got = run(loader)
    assert [b.step for b in got] == list(range(6)) and sum(b.skipped for b in got) == 0
    assert {t.ident for t in threading.enumerate()} <= before | {threading.get_ident()}


def requests_of(srv: Server, name: str) -> int:
    lines = srv.log.read_text().split() if srv.log.exists() else []
    return sum(p.rsplit("/", 1)[-1] == name for p in lines)


@pytest.mark.parametrize("what", ["tar", "index"])
def test_a_missing_shard_is_requested_once_across_workers(shard_dir, server, tmp_path, what):
    """Two forked workers both need shard 1, which answers 404: one request in all (the 404 is
    remembered in memory the workers share), its samples skipped (skips on) in both workers' batches."""
    local = ShardSet.open(shard_dir)
    gone = (local.shard_url(1) if what == "tar" else local.index_url(1)).rsplit("/", 1)[-1]
    srv = server(missing=[gone])
    remote = ShardSet.open(srv.url + "/manifest.json")
    sched = SlidingWindowScheduler(len(remote), 32, 8, seed=0)   # window 0 = shards 0..3
    got = run(WindowLoader(remote, sched, 8, image_size=8, workers=2, num_steps=4,
                           cache_dir=str(tmp_path / "c"), on_missing="skip"))
    assert all(len(b) == 8 for b in got) and not any(8 <= i < 16 for b in got for i in b.ids.tolist())
    assert {b.step % 2 for b in got if b.skip_reasons.get("missing")} == {0, 1}   # both workers
    assert requests_of(srv, gone) == 1


def test_stale_partial_downloads_are_removed_when_the_loader_starts(shard_dir, server, tmp_path):
    srv = server()
    remote = ShardSet.open(srv.url + "/manifest.json")
    cache = tmp_path / "c"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, live = cache / f"0123-shard-000000.tar.{dead}.part", cache / f"0123-shard-000001.tar.{os.getpid()}.part"
    for p in (stale, live):
        p.write_bytes(b"partial")
    WindowLoader(remote, SlidingWindowScheduler(len(remote), 16, 8), 8, image_size=8, workers=0,
                 num_steps=1, cache_dir=str(cache)).close()
    assert not stale.exists() and live.exists()                 # a live process's download is kept


def test_a_damaged_remote_manifest_is_read_again_then_refused(shard_dir, tmp_path):
    """A manifest that fails its digest on every read: each try is one request, counted as a retry
    of kind "manifest", then one ShardsError line."""
    root = tmp_path / "served"
    shutil.copytree(shard_dir, root)
    path = root / "manifest.json"
    path.write_text(path.read_text().replace('"shard-000003.tar"', '"shardx000003.tar"', 1))
    srv = Server(root, tmp_path / "log")
    try:
        with pytest.raises(DamagedManifest) as err:
            ShardSet.open(srv.url + "/manifest.json", retry=RetryPolicy(attempts=3, base=0.0))
    finally:
        srv.close()
    assert str(err.value) == (f"shard manifest {srv.url}/manifest.json does not match its digest in 3 reads: "
                              "the copy there is damaged")
    assert requests_of(srv, "manifest.json") == 3


def test_damaged_remote_records_are_read_again_then_refused(tmp_path):
    """A v3 records file whose block table fails its sha256 on every read: read again under the retry
    policy (header + table per try), then one ShardsError line naming it."""
    root = tmp_path / "v3"
    synthetic_set(root, 100)
    flip(root / R.RECORDS_FILE, R.HEADER.size + 5)
    srv = Server(root, tmp_path / "log")
    try:
        with pytest.raises(ShardsError) as err:
            ShardSet.open(srv.url + "/manifest.json", retry=RetryPolicy(attempts=3, base=0.0))
    finally:
        srv.close()
    assert str(err.value) == (f"shard records {srv.url}/{R.RECORDS_FILE}: reading the header and block table: "
                              "3 tries failed, last: DamagedData: header and block table do not match their "
                              "sha256 in the manifest")
    assert requests_of(srv, R.RECORDS_FILE) == 6
