"""ShardSet and make_shards over real HTTP on 127.0.0.1: ranged reads, servers ignoring Range, URL sources."""
from __future__ import annotations

import functools
import io
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from picstream.shards import ShardSet, make_shards


class RangeHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler that honours `Range: bytes=a-b` (206) and logs the ranges served."""

    def send_head(self):
        rng = self.headers.get("Range")
        if rng is None:
            self.server.requests.append((self.path, None))
            return super().send_head()
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
        data = Path(self.translate_path(self.path)).read_bytes()
        start, end = int(m[1]), min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
        self.server.requests.append((self.path, (start, end)))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start:end + 1])

    def log_message(self, *args):
        pass


class PlainHandler(SimpleHTTPRequestHandler):
    """What `python -m http.server` does: Range ignored, always the whole file."""

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(1)
    for c in ("x", "y"):
        (src / c).mkdir()
        for i in range(20):
            img = Image.fromarray(rng.integers(0, 256, (16 + i, 20, 3), dtype=np.uint8))
            img.save(src / c / f"{i:03d}.jpg", quality=90)
    out = tmp_path_factory.mktemp("out")
    make_shards(src, out, shard_size=16, progress=False)
    return src, out


def serve(root: Path, handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def ranged(shards):
    server, url = serve(shards[1], RangeHandler)
    yield server, url
    server.shutdown()


def test_ranged_reads(shards, ranged):
    server, url = ranged
    local, remote = ShardSet.open(shards[1]), ShardSet.open(url + "/manifest.json")
    assert len(remote) == len(local) == 40 and remote.label_names == ["x", "y"]
    remote.index(1)  # cache the index, then each read is exactly one ranged request
    server.requests.clear()
    for sid in (16, 31, 20):
        assert remote.read(sid) == local.read(sid)
        off, size, _ = local.index(1)[sid - 16]
        assert server.requests[-1] == ("/shard-000001.tar", (off, off + size - 1))
    assert len(server.requests) == 3
    assert [(i, b, l) for i, b, l in remote.iter_range(10, 40)] == list(local.iter_range(10, 40))
    assert remote.labels(range(40)).tolist() == local.labels(range(40)).tolist()
    assert remote.verify() == []


def test_server_ignoring_range(shards):
    server, url = serve(shards[1], PlainHandler)
    try:
        local, remote = ShardSet.open(shards[1]), ShardSet.open(url)
        assert [remote.read(i) for i in (0, 17, 39)] == [local.read(i) for i in (0, 17, 39)]
        whole = remote.fs.cat_file(remote.shard_url(2))
        assert whole == (shards[1] / "shard-000002.tar").read_bytes()
        assert remote.verify() == []
    finally:
        server.shutdown()


def test_url_list_source(shards, tmp_path):
    """Inputs listed in a file served over HTTP, read over HTTP: same shards as the local list."""
    src = shards[0]
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.jpg"))
    (src / "list.csv").write_text("".join(f"{f},{f[0]}\n" for f in files))
    server, url = serve(src, RangeHandler)
    try:
        make_shards(url + "/list.csv", tmp_path / "remote", shard_size=16, progress=False)
    finally:
        server.shutdown()
    make_shards(src / "list.csv", tmp_path / "local", shard_size=16, progress=False)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000002.idx"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


def _read_all(ss: ShardSet) -> list[bytes]:
    return [ss.read(i) for i in range(len(ss))]


def test_fork_and_pickle(shards, ranged):
    """Used in the parent (starting fsspec's HTTP machinery), then in forked and spawned children."""
    import multiprocessing
    import pickle
    import threading

    before = threading.active_count()
    local = ShardSet.open(shards[1])
    expected = _read_all(local)
    assert threading.active_count() == before  # local open/read starts no threads
    remote = ShardSet.open(ranged[1])
    assert remote.read(3) == expected[3]
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(2) as pool:
            assert pool.map(_read_all, [remote, local]) == [expected, expected]
    assert _read_all(pickle.loads(pickle.dumps(remote))) == expected


def test_url_output(shards, ranged, tmp_path):
    from picstream.shards import ShardsError

    src, out = shards
    make_shards(f"file://{src}", f"file://{tmp_path}/o", shard_size=16, progress=False)
    assert (tmp_path / "o" / "shard-000001.tar").read_bytes() == (out / "shard-000001.tar").read_bytes()
    with pytest.raises(ShardsError, match="cannot write to http://"):
        make_shards(src, ranged[1] + "/new", progress=False)


def test_url_folder_source(shards, tmp_path):
    """A folder tree served with directory listings (like `python -m http.server`): same shards as local."""
    src, out = shards
    server, url = serve(src, PlainHandler)
    try:
        make_shards(url + "/", tmp_path / "o", shard_size=16, progress=False)
    finally:
        server.shutdown()
    remote, local = ShardSet.open(tmp_path / "o"), ShardSet.open(out)
    assert remote.label_names == local.label_names == ["x", "y"]
    for k in range(local.num_shards):
        assert Path(remote.shard_url(k)).read_bytes() == Path(local.shard_url(k)).read_bytes()
