"""A real S3 endpoint for the tests: moto's server on 127.0.0.1 (a free port), a bucket made with boto3, and
the `--storage` URI that reaches it (pyarrow's `endpoint_override`/`scheme` query)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import boto3
from moto.server import ThreadedMotoServer

from cli_runs import free_port

# moto accepts any key; the driver, its Ray workers and the worker nodes get these through their environment.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lcsc-test", "AWS_SECRET_ACCESS_KEY": "lcsc-test", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Bucket:
    endpoint: str  # http://127.0.0.1:PORT
    name: str

    def uri(self, prefix: str) -> str:
        """The --storage URI of `prefix` in this bucket."""
        return f"s3://{self.name}/{prefix}?endpoint_override={self.endpoint}&scheme=http"

    @property
    def client(self):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()


@contextlib.contextmanager
def s3_bucket(name: str = "lcsc-test") -> Iterator[Bucket]:
    """moto's S3 server in a thread of this process with one empty bucket; stopped afterwards."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        bucket = Bucket(f"http://127.0.0.1:{port}", name)
        bucket.client.create_bucket(Bucket=name)
        yield bucket
    finally:
        server.stop()


def with_credentials(env: dict[str, str]) -> dict[str, str]:
    """`env` with the test credentials (and no AWS profile of this machine in the way)."""
    return {**{k: v for k, v in env.items() if not k.startswith("AWS_")}, **CREDENTIALS,
            "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
