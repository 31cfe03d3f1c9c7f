"""Credentials and permissions on S3: moto's server with IAM checks on (`INITIAL_NO_AUTH_ACTION_COUNT`),
a user who may do everything, a user who may only read, and a key that does not exist. Each refusal is
one line, exit 2, and writes nothing to the bucket."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_s3 import SHARDS, make_shards_cli, wds_tars  # noqa: F401  (wds_tars: a fixture)
from test_train import train_cmd

READ = ["s3:GetObject", "s3:ListBucket", "s3:ListAllMyBuckets", "s3:GetBucketLocation"]
USERS = {"writer": ["s3:*"], "reader": READ}


@pytest.fixture(scope="module")
def iam_server():
    """An S3 endpoint that checks credentials and permissions: the first actions (unchecked) create the
    users of USERS; their keys are in ``server.keys``, plus ``bogus``, a key the server does not know."""
    from conftest import require

    require("s3fs")
    require("moto")
    import boto3
    from s3_server import CREDENTIALS, MotoServer

    setup = 3 * len(USERS)  # create_user, put_user_policy, create_access_key per user
    server = MotoServer({"INITIAL_NO_AUTH_ACTION_COUNT": str(setup)})
    iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    server.keys = {"bogus": ("AKIAPICSTREAMBOGUS00", "not-a-secret")}
    for user, actions in USERS.items():
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName=f"{user}-policy", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        server.keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
    yield server
    server.close()


def as_user(server, user: str) -> dict[str, str]:
    """The environment of a command run with `user`'s credentials against `server`."""
    key, secret = server.keys[user]
    return {**os.environ, **server.env, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}


def writer_fs(server):
    import s3fs

    key, secret = server.keys["writer"]
    return s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": server.endpoint},
                             skip_instance_cache=True)


@pytest.fixture(scope="module")
def bucket(iam_server, wds_tars, tmp_path_factory) -> str:
    """A bucket made by the writer, holding the webdataset tars and shards made from them."""
    fs = writer_fs(iam_server)
    fs.mkdir("picstream-access")
    for tar in sorted(wds_tars.glob("*.tar")):
        fs.put_file(str(tar), f"picstream-access/wds/{tar.name}")
    built = make_shards_cli("s3://picstream-access/wds/{00000..00001}.tar", "s3://picstream-access/shards",
                            *SHARDS, env=as_user(iam_server, "writer"))
    assert built.returncode == 0, built.stderr
    return "s3://picstream-access"


def objects(server) -> set[str]:
    return set(writer_fs(server).find("picstream-access"))


def run(cmd: list[str], server, user: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=as_user(server, user), capture_output=True, text=True, timeout=600)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (exit 2, nothing else on stderr)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr[-2000:])
    return lines[0]


def test_a_key_the_server_does_not_know_is_one_line_per_command_and_writes_nothing(iam_server, bucket, wds_tars,
                                                                                     tmp_path):
    before = objects(iam_server)
    unknown = "The AWS Access Key Id you provided does not exist in our records."
    out = make_shards_cli(wds_tars / "00000.tar", f"{bucket}/out", "--quiet", env=as_user(iam_server, "bogus"))
    assert one_line(out) == f"make_shards: error: cannot write to {bucket}/out: PermissionError: {unknown}"
    src = make_shards_cli(f"{bucket}/wds/{{00000..00001}}.tar", tmp_path / "local", "--quiet",
                          env=as_user(iam_server, "bogus"))
    assert one_line(src) == f"make_shards: error: cannot access source {bucket}/wds/00000.tar: {unknown}"
    manifest = f"{bucket}/shards/manifest.json"
    unread = f"cannot read shard manifest {manifest}: access denied (Forbidden): check the credentials"
    train = run(train_cmd(tmp_path / "run", manifest), iam_server, "bogus")
    assert one_line(train) == f"picstream-train: error: {unread} and the permissions of where it lies"
    verify = run([sys.executable, "-m", "picstream.verify", manifest, "--quiet"], iam_server, "bogus")
    assert one_line(verify).startswith(f"picstream-verify: error: {unread}")
    assert objects(iam_server) == before
    assert not any(tmp_path.iterdir())


def test_a_read_only_user_reads_but_every_write_is_one_line_and_writes_nothing(iam_server, bucket, wds_tars,
                                                                               tmp_path):
    before = objects(iam_server)
    manifest = f"{bucket}/shards/manifest.json"
    reads = run(train_cmd(tmp_path / "reads", manifest, "train.max_steps=2"), iam_server, "reader")
    assert reads.returncode == 0, reads.stderr[-2000:]  # the same credentials stream the shards
    out = make_shards_cli(wds_tars / "00000.tar", f"{bucket}/out", "--quiet", env=as_user(iam_server, "reader"))
    assert one_line(out) == f"make_shards: error: cannot write to {bucket}/out: PermissionError: Access Denied"
    store = f"{bucket}/store"
    train = run(train_cmd(tmp_path / "run", manifest, f"classifier.store={store}"), iam_server, "reader")
    assert one_line(train) == (f"picstream-train: error: row store {store}: access denied (Access Denied): check "
                               "the credentials and the permissions there (a run writes its row store)")
    assert objects(iam_server) == before
    # locally, the refused run leaves its identity only (a rerun with write access continues with it)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "run.json"]


def test_a_run_resumed_by_a_read_only_user_stops_with_one_line_at_its_first_write(iam_server, bucket, tmp_path):
    manifest, store = f"{bucket}/shards/manifest.json", f"{bucket}/resumed-store"
    cmd = train_cmd(tmp_path / "run", manifest, f"classifier.store={store}", "train.max_steps=4",
                    "train.checkpoint_every=2")
    first = run(cmd, iam_server, "writer")
    assert first.returncode == 0, first.stderr[-2000:]
    newest = max((tmp_path / "run" / "checkpoints").iterdir())
    newest.unlink()  # the run resumes at step 2: its first write restores the store's rows of step 2
    before = objects(iam_server)
    line = one_line(run(cmd, iam_server, "reader"))
    assert line.startswith("picstream-train: error: access denied: ") and line.endswith(
        "fix the credentials or permissions, then rerun the same command: it resumes from the last checkpoint")
    assert objects(iam_server) == before
    again = run(cmd, iam_server, "writer")
    assert again.returncode == 0 and "at step 2" in again.stdout + again.stderr, again.stderr[-2000:]
