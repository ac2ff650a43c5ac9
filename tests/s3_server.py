"""A real S3-compatible server for tests: moto's standalone server in its own process on
127.0.0.1, with credentials checked (a wrong secret is refused as it would be by S3).

Two IAM users: `embshard`, whose key the code under test uses (`env`), and `admin`, whose key the
tests' own requests use (`client`), so a test can revoke the first (`revoke`) and still look into
the bucket, then hand out a new key (`grant`). `kill` ends the server process (SIGKILL): the store
goes away mid-request, as a crashed or unplugged server does; its contents are lost with it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import boto3

# moto lets this many requests through unauthenticated: the three that create the admin user,
# its policy and its access key. Every request after them must be signed with a user's key.
_SETUP_REQUESTS = 3
_USER = "embshard"
_ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    admin_key: tuple[str, str]  # (access key, secret) of the admin user: the tests' own requests
    process: subprocess.Popen = field(compare=False, repr=False)
    region: str = "us-east-1"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach the server (the same variables users set)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}

    def client(self, service: str = "s3"):  # noqa: ANN201 - boto3's client type is generated at run time
        """A client signed with the admin key: it still works after `revoke`."""
        return boto3.client(service, endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.admin_key[0], aws_secret_access_key=self.admin_key[1])

    def revoke(self) -> None:
        """Delete the access key in `env`: every request signed with it is refused from now on."""
        self.client("iam").delete_access_key(UserName=_USER, AccessKeyId=self.access_key)

    def grant(self) -> "S3Server":
        """A new access key for the same user: the server as a process given `env` now sees it."""
        key = self.client("iam").create_access_key(UserName=_USER)["AccessKey"]
        return replace(self, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@dataclass(frozen=True)
class S3Bucket:
    server: S3Server
    name: str

    def uri(self, prefix: str) -> str:
        return f"s3://{self.name}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        """The objects under `prefix`, less the empty "folder/" markers pyarrow leaves for a parent."""
        return [k for k in self.server.keys(self.name, prefix) if not k.endswith("/")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def s3_server(log: Path) -> Iterator[S3Server]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_REQUESTS)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        admin = _user(endpoint, "admin", ("setup", "setup"))
        user = _user(endpoint, _USER, admin)
        yield S3Server(endpoint, *user, admin_key=admin, process=proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def _user(endpoint: str, name: str, signer: tuple[str, str]) -> tuple[str, str]:
    """A user allowed everything, created with `signer`'s key; -> its (access key, secret)."""
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id=signer[0], aws_secret_access_key=signer[1])
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="all", PolicyDocument=_ALLOW_ALL)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]
