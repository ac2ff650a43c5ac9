"""Object-store URIs as `location` reads them, without a store: what names one prefix, and how
paths below it are spelled for pyarrow and for fsspec (DCP's checkpoints)."""

from __future__ import annotations

import pickle

import pytest

from embshard.datasets.storage import RemotePath, location
from embshard.errors import StorageError
from embshard.trainer.checkpoint_integrity import check_checkpoint_io


@pytest.mark.parametrize("uri, said", [
    ("s3://b/x/..", r"a '\.\.' in an object-store key names no prefix"),
    ("s3://b/new/../ds", r"a '\.\.' in an object-store key names no prefix"),
    ("s3://b/xx/.", r"a '\.' in an object-store key names no prefix"),
    ("s3://b/x/%2E%2E", r"a '\.\.' in an object-store key names no prefix"),
    ("s3://b/ds%2Fsub", r"'ds%2Fsub' encodes a '/' inside one name; write the '/' itself"),
])
def test_a_key_that_names_no_one_prefix_is_refused(uri: str, said: str) -> None:
    # pyarrow took `..` as a name: a write ran whole, then failed as "access denied"; `%2F` made a
    # message name the bucket as the folder the dataset was inside.
    with pytest.raises(StorageError, match=rf"^{uri.replace('.', '[.]')}: {said}"):
        location(uri)


def test_uri_options_stay_on_every_path_below() -> None:
    # `?region=...` became `...?region=us-east-1/profile`: a key pyarrow could not find.
    data = location("s3://b/data?region=us-east-1")
    assert isinstance(data, RemotePath)
    assert str(data / "profile") == "s3://b/data/profile?region=us-east-1"
    assert (data / "profile").name == "profile" and str(data.parent) == "s3://b?region=us-east-1"
    assert pickle.loads(pickle.dumps(data / "train")) == location(str(data / "train")) == data / "train"
    # DCP's client reads no such options: a checkpoint there would go to the environment's endpoint.
    with pytest.raises(StorageError, match=r"^s3://b/data\?region=us-east-1: checkpoints are read and written "
                                           r"through fsspec, which does not take pyarrow's URI options"):
        check_checkpoint_io(data, "checkpoint.dir")


def test_names_are_encoded_for_pyarrow_and_decoded_for_fsspec() -> None:
    spaced = location("s3://b/sp%20ace")
    assert str(spaced / "a b" / "c=1") == "s3://b/sp%20ace/a%20b/c=1"
    assert (spaced / "a b").fsspec_uri == "s3://b/sp ace/a b"
    assert location("s3://b/plain/ck").fsspec_uri == "s3://b/plain/ck"
