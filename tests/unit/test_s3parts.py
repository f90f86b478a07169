"""stratus.s3parts.PartWriter against moto's S3: small objects in one PutObject, big ones in parts."""

from __future__ import annotations

import os

import boto3
import pytest
from moto import mock_aws

from stratus import s3parts
from stratus.s3parts import PartWriter


@pytest.fixture
def s3(monkeypatch):
    for k, v in {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        client = boto3.client("s3")
        client.create_bucket(Bucket="out")
        yield client


def written(s3, key: str) -> bytes:
    return s3.get_object(Bucket="out", Key=key)["Body"].read()


def test_what_never_fills_a_part_is_one_put(s3):
    w = PartWriter(s3, "out", "small.jsonl", "application/jsonl")
    for i in range(100):
        w.write(f"line {i}\n".encode())
    w.close()
    assert written(s3, "small.jsonl") == b"".join(f"line {i}\n".encode() for i in range(100))
    assert s3.list_multipart_uploads(Bucket="out").get("Uploads", []) == []
    w = PartWriter(s3, "out", "empty.jsonl", "application/jsonl")
    w.close()
    assert written(s3, "empty.jsonl") == b""


def test_a_big_object_goes_in_parts_holding_one_at_a_time(s3):
    # Given 20 MiB written a 64 KiB piece at a time
    piece = os.urandom(64 * 1024)
    w = PartWriter(s3, "out", "big.jsonl", "application/jsonl")
    for _ in range(320):
        w.write(piece)
        assert w._buffered < s3parts.PART_BYTES  # a full part goes as soon as it is full
    w.close()
    # Then the object is every byte, in order, from three parts (8 + 8 + 4 MiB)
    assert written(s3, "big.jsonl") == piece * 320
    assert s3.head_object(Bucket="out", Key="big.jsonl", PartNumber=1)["PartsCount"] == 3


def test_an_aborted_writer_leaves_no_object_and_no_open_upload(s3):
    w = PartWriter(s3, "out", "gone.jsonl", "application/jsonl")
    w.write(os.urandom(s3parts.PART_BYTES))  # one part sent
    w.abort()
    assert s3.list_objects_v2(Bucket="out").get("KeyCount") == 0
    assert s3.list_multipart_uploads(Bucket="out").get("Uploads", []) == []
