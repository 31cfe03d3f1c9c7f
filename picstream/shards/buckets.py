"""Output in an object store: make_shards writes into an existing bucket and never creates one (s3fs's
``makedirs`` would, silently, with whatever region and permissions the credentials default to)."""
from __future__ import annotations

from .format import ShardsError

BUCKET_SCHEMES = ("s3", "s3a", "gs", "gcs")


def check_bucket(out: str, fs, root: str) -> None:
    """Refuse an ``out`` URL whose bucket (the first part of ``root``) does not exist. A bucket these
    credentials may not look at (``exists`` would say False) is left to the first write to refuse: a user
    may write where they cannot list."""
    if out.split("://", 1)[0] in BUCKET_SCHEMES and "://" in out:
        bucket = root.split("/", 1)[0]
        try:
            fs.info(bucket)
        except FileNotFoundError:
            raise ShardsError(f"{out}: bucket {bucket} does not exist (make_shards does not create buckets)") from None
        except PermissionError:
            pass
