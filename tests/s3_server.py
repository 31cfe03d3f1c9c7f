"""A real S3 endpoint on 127.0.0.1 for the tests: moto's server mode (what s3fs tests itself against),
in a subprocess of its own, with fake credentials that exist only in the environment of the test."""
from __future__ import annotations

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

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
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
