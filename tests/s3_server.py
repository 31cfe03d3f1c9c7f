"""A real S3 endpoint on 127.0.0.1 for the tests: moto's server mode (what s3fs tests itself against),
in a subprocess of its own, with fake credentials that exist only in the environment of the test."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

SERVER = r"""
import logging
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
import sys; sys.stdin.read()   # runs until the test closes its stdin
server.stop()
"""

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "picstream-test", "AWS_SECRET_ACCESS_KEY": "picstream-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/nonexistent",
               "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}


class MotoServer:
    """moto's S3 on a free port; ``env`` is what a client (s3fs, or a subprocess) needs to reach it."""

    def __init__(self, server_env: dict[str, str] | None = None):
        """`server_env`: moto settings for the server process (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT``)."""
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, **(server_env or {})})
        self.port = int(self.proc.stdout.readline())
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def new_bucket(name: str | None = None) -> str:
    """Create a bucket (a fresh name unless given) through s3fs; returns its name."""
    import s3fs

    bucket = name or f"picstream-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return bucket


# argv: upstream port, log file, seed, fault rate, planned prefix. A request's key is METHOD:object key
# (the bucket left out, so a fresh bucket gets the same faults). The first request of each key whose
# object key starts with the planned prefix (none when empty) is a fault, these keys taking 503, 500
# and reset in turn as they first come; any other request, the n-th of its key, gets a fault with
# probability `rate`, chosen by a hash of (seed, key, n). A key gets at most 3 faults in all, so a
# client that retries a read of k keys 3k times gets through whichever process sends which request.
# Faults: 503 SlowDown, 500 InternalError (no body to a HEAD, as S3 does), or the connection reset
# before a response.
PROXY = r"""
import hashlib, http.client, itertools, random, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

upstream, log, seed, rate, planned = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5]
KINDS, MAX_FAULTS = ("503", "500", "reset"), 3
lock, requests, faults, turns = threading.Lock(), {}, {}, itertools.count()
ERRORS = {"503": (503, "SlowDown", "Please reduce your request rate."),
          "500": (500, "InternalError", "We encountered an internal error. Please try again.")}

def choose(method, path):
    obj = path[1:].partition("/")[2]
    key = f"{method}:{obj}"
    with lock:
        n = requests[key] = requests.get(key, 0) + 1
        if faults.get(key, 0) == MAX_FAULTS:
            kind = "ok"
        elif n == 1 and planned and obj.startswith(planned):
            kind = KINDS[next(turns) % len(KINDS)]
        else:
            rng = random.Random(hashlib.blake2b(f"{seed}:{key}:{n}".encode()).digest())
            kind = rng.choice(KINDS) if rng.random() < rate else "ok"
        if kind != "ok":
            faults[key] = faults.get(key, 0) + 1
        with open(log, "a") as f:
            f.write(f"{method}:{path} {kind}\n")
    return kind

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        kind = choose(self.command, self.path.split("?")[0])
        if kind == "reset":
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return
        if kind in ERRORS:
            status, code, message = ERRORS[kind]
            data = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return
        conn = http.client.HTTPConnection("127.0.0.1", upstream)
        conn.request(self.command, self.path, body=body, headers=dict(self.headers))
        reply = conn.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for name, value in reply.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
"""


class FaultyProxy:
    """A seeded fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 server (the fault plan is
    above PROXY); ``env`` points clients at it instead."""

    def __init__(self, upstream: MotoServer, log, seed: int, rate: float, planned_prefix: str = ""):
        """`planned_prefix`: the first request of each method on every object whose key starts with
        it is a fault, whatever `seed` and `rate` draw."""
        self.log = log
        argv = [sys.executable, "-c", PROXY, str(upstream.port), str(log), str(seed), str(rate), planned_prefix]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.env = {**upstream.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{int(self.proc.stdout.readline())}"}

    def served(self) -> list[tuple[str, str]]:
        """(method:path, fault or "ok") of every request, in order."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [tuple(line.rsplit(" ", 1)) for line in lines]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
