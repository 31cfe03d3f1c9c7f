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


# argv: upstream port, log file, seed, fault rate. Request n of (method, path) gets a fault with
# probability `rate` (at most 3 in a row, so a retrying client gets through), chosen by a hash of
# (seed, method, path, n): 503 SlowDown, 500 InternalError, or the connection reset before a response.
PROXY = r"""
import hashlib, http.client, random, socket, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

upstream, log, seed, rate = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
lock, requests, streak = threading.Lock(), {}, {}
ERRORS = {"503": (503, "SlowDown", "Please reduce your request rate."),
          "500": (500, "InternalError", "We encountered an internal error. Please try again.")}

def choose(key):
    with lock:
        n = requests[key] = requests.get(key, 0) + 1
        rng = random.Random(hashlib.blake2b(f"{seed}:{key}:{n}".encode()).digest())
        kind = rng.choice(["503", "500", "reset"]) if rng.random() < rate and streak.get(key, 0) < 3 else "ok"
        streak[key] = streak.get(key, 0) + 1 if kind != "ok" else 0
        with open(log, "a") as f:
            f.write(f"{key} {kind}\n")
    return kind

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        kind = choose(f"{self.command}:{self.path.split('?')[0]}")
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
    """A seeded fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 server; ``env`` points
    clients at it instead."""

    def __init__(self, upstream: MotoServer, log, seed: int, rate: float):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", PROXY, str(upstream.port), str(log), str(seed),
                                      str(rate)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.env = {**upstream.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{int(self.proc.stdout.readline())}"}

    def served(self) -> list[tuple[str, str]]:
        """(method:path, fault or "ok") of every request, in order."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return [tuple(line.rsplit(" ", 1)) for line in lines]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()
