"""Training through a misbehaving HTTP server on 127.0.0.1 (503s, connections cut mid-body, short
bodies with a matching Content-Length, flipped bytes; seeded), the manifest and the v3 records sidecar
included: the same loss curve as from the local copy, nothing skipped, retries in the metrics by kind
of read, and a later run re-uses only verified cache entries. A shard deleted from a served set stops
the run with one line naming it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from picstream.loader.cache import cache_name, matches_record
from picstream.shards import ShardSet, make_shards

from test_train import losses, train_cmd

# argv: root, log file, seed, fault rate. Request n of a path gets a fault with probability `rate`
# (at most 3 in a row, so a retrying client always gets through), chosen by a hash of (seed, path, n).
SERVER = r"""
import hashlib, json, random, string, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

root, log, seed, rate = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
lock, requests, streak = threading.Lock(), {}, {}

def choose(path):
    with lock:
        n = requests[path] = requests.get(path, 0) + 1
        rng = random.Random(hashlib.blake2b(f"{seed}:{path}:{n}".encode()).digest())
        kind = "ok"
        if rng.random() < rate and streak.get(path, 0) < 3:
            kind = rng.choice(["503", "cut", "short", "flip"])
        streak[path] = streak.get(path, 0) + 1 if kind != "ok" else 0
        with open(log, "a") as f:
            f.write(f"{path} {kind}\n")
    return kind, rng

# One changed character per 4 KiB in names, numbers or hex digests (a digit for a digit, a hex letter
# for a hex letter, a letter for a letter), each leaving a JSON document that parses to something
# else: a shard name, a count, an ID or a sha256 the reader must not believe.
def flip_json(data, rng):
    want, text = json.loads(data), bytearray(data)
    for _ in range(max(1, len(data) // 4096)):
        while True:
            at = rng.randrange(len(text))
            c = chr(text[at])
            pool = (string.digits if c.isdigit() else "abcdef" if c in "abcdef"
                    else string.ascii_lowercase if c.islower() else "")
            if not pool:
                continue
            trial = bytearray(text)
            trial[at] = ord(rng.choice(pool.replace(c, "")))
            try:
                if json.loads(trial) != want:
                    text = trial
                    break
            except ValueError:
                pass
    return bytes(text)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        file = root / self.path.lstrip("/")
        if not file.is_file():
            return self.send_error(404)
        data = file.read_bytes()
        kind, rng = choose(self.path)
        if kind == "503":
            return self.send_error(503)
        body = bytearray(data)
        if kind == "short":
            body = body[:rng.randrange(len(data))]
        elif kind == "flip" and file.suffix == ".json":
            body = flip_json(data, rng)
        elif kind == "flip":   # one flipped bit per 4 KiB
            for block in range(0, len(body), 4096):
                at = min(len(body) - 1, block + rng.randrange(4096))
                body[at] ^= 1 << rng.randrange(8)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if kind == "cut" else body)   # cut: close mid-body

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


class Server:
    def __init__(self, root: Path, log: Path, seed: int, rate: float):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(log), str(seed),
                                      str(rate)], stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.proc.stdout.readline().strip()}"

    def served(self) -> list[tuple[str, str]]:
        """(file name, fault or "ok") of every GET, in order."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [(path.rsplit("/", 1)[-1], kind) for path, kind in (line.split() for line in lines)]

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(root: Path, seed: int = 0, rate: float = 0.0) -> Server:
        servers.append(Server(root, tmp_path / f"served{len(servers)}.log", seed, rate))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def train(run_dir: Path, manifest: str, *extra: str) -> list[dict]:
    result = subprocess.run(train_cmd(run_dir, manifest, "train.max_steps=12", *extra),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_losses(shapes_shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local")
    train(run_dir, str(shapes_shards[0]))
    yield losses(run_dir)
    shutil.rmtree(run_dir)  # its checkpoints are large; only the losses are compared


def assert_retries_match(served: list[tuple[str, str]], last: dict) -> None:
    """Every fault of the manifest is one retry of kind "manifest" (a whole-body read detects each);
    the records, shard and index reads were retried at most once per fault."""
    faults = Counter(kind for _, kind in served if kind != "ok")
    assert set(faults) == {"503", "cut", "short", "flip"}
    by_read = last["retries_by_read"]
    manifest_faults = sum(1 for name, kind in served if name == "manifest.json" and kind != "ok")
    assert by_read.get("manifest", 0) == manifest_faults > 0
    assert 0 < last["retries"] <= sum(faults.values()) and set(by_read) >= {"shard", "index"}


@pytest.mark.slow
def test_training_through_a_faulty_server_equals_local(shapes_shards, local_losses, serve, tmp_path):
    manifest = Path(shapes_shards[0])
    expected = local_losses

    faulty = serve(manifest.parent, seed=1, rate=0.75)   # every fault kind, on the manifest too
    cache = tmp_path / "cache"
    records = train(tmp_path / "faulty", faulty.url + "/manifest.json", f"data.cache_dir={cache}")
    assert losses(tmp_path / "faulty") == expected
    served = faulty.served()
    assert any(name == "manifest.json" and kind == "flip" for name, kind in served)
    last = records[-1]
    assert last["skipped"] == 0 and last["skip_reasons"] == {}
    assert_retries_match(served, last)

    ss = ShardSet.open(manifest)
    entries = {k: cache / cache_name(ss.shard_record(k)) for k in range(ss.num_shards)}
    entries = {k: e for k, e in entries.items() if e.exists()}          # the shards the run read
    assert {0, 1} <= set(entries) and all(matches_record(str(e), ss.shard_record(k))
                                          for k, e in entries.items())
    assert not list(cache.glob("*.part"))

    # Poison two entries: flip a bit in every image of shard 0, truncate shard 1.
    data = bytearray(entries[0].read_bytes())
    for off, _, _ in ss.index(0).tolist():
        data[off] ^= 4
    entries[0].write_bytes(bytes(data))
    entries[1].write_bytes(entries[1].read_bytes()[:-1000])
    healthy = serve(manifest.parent)
    records = train(tmp_path / "again", healthy.url + "/manifest.json", f"data.cache_dir={cache}")
    assert losses(tmp_path / "again") == expected
    assert records[-1]["skipped"] == 0 and records[-1]["retries"] == 0
    tars = sorted(name for name, _ in healthy.served() if name.endswith(".tar"))
    assert tars == [ss.shard_record(0)["name"], ss.shard_record(1)["name"]]   # only the poisoned
    assert all(matches_record(str(e), ss.shard_record(k)) for k, e in entries.items())
    assert np.isfinite([loss for _, loss in expected]).all()


@pytest.mark.slow
def test_training_through_a_faulty_server_with_a_records_sidecar(shapes_shards, local_losses, serve,
                                                                 tmp_path):
    """The same shards with their records in a v3 sidecar (`shards.bin`), damaged in transit too."""
    manifest = Path(shapes_shards[0])
    out = tmp_path / "sidecar"
    make_shards(str(manifest.parents[1] / "images" / "train"), str(out), shard_size=64, seed=0,
                progress=False, records="sidecar")
    v2, v3 = ShardSet.open(manifest), ShardSet.open(out)
    assert v3.version == 3 and [v3.shard_record(k) for k in range(v3.num_shards)] == \
        [v2.shard_record(k) for k in range(v2.num_shards)]                      # the very same shards
    faulty = serve(out, seed=3, rate=0.75)
    records = train(tmp_path / "faulty", faulty.url + "/manifest.json", f"data.cache_dir={tmp_path / 'c'}")
    assert losses(tmp_path / "faulty") == local_losses
    served = faulty.served()
    last = records[-1]
    assert last["skipped"] == 0 and last["skip_reasons"] == {}
    assert_retries_match(served, last)
    sidecar_faults = sum(1 for name, kind in served if name == "shards.bin" and kind != "ok")
    assert 0 < last["retries_by_read"].get("records", 0) <= sidecar_faults


def serve_without_shard_1(shapes_shards, serve, tmp_path) -> Server:
    root = tmp_path / "served"
    shutil.copytree(Path(shapes_shards[0]).parent, root)
    Path(ShardSet.open(root).shard_url(1)).unlink()
    return serve(root)


@pytest.mark.slow
def test_a_shard_deleted_from_a_served_set_stops_the_run_with_one_line(shapes_shards, serve, tmp_path):
    server = serve_without_shard_1(shapes_shards, serve, tmp_path)
    result = subprocess.run(train_cmd(tmp_path / "run", server.url + "/manifest.json", "train.max_steps=12",
                                      f"data.cache_dir={tmp_path / 'c'}"),
                            capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("picstream-train: error")]
    url = f"{server.url}/shard-000001.tar"
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert errors == [f"picstream-train: error: shard 1 is missing: {url}, which the manifest of {server.url} "
                      "lists: the shard set is incomplete; restore it, or set data.on_missing=skip to train on "
                      "without it"]
    assert [kind for name, kind in server.served() if name == "shard-000001.tar"] == []   # a 404, not served


@pytest.mark.slow
def test_on_missing_skip_trains_on_and_counts_the_missing_shard(shapes_shards, serve, tmp_path):
    """``data.on_missing=skip`` through the CLI: the run finishes, the missing shard's samples counted
    as skipped (reason ``missing``), none of its bytes served."""
    server = serve_without_shard_1(shapes_shards, serve, tmp_path)
    records = train(tmp_path / "run", server.url + "/manifest.json", "data.on_missing=skip",
                    f"data.cache_dir={tmp_path / 'c'}")
    last = [r for r in records if "loss" in r][-1]
    assert last["skipped"] > 0, last
    assert set(last["skip_reasons"]) == {"missing"}, last["skip_reasons"]
    assert [kind for name, kind in server.served() if name == "shard-000001.tar"] == []
