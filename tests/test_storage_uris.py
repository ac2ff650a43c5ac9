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
    ("s3://b/a#b", r"a '#' in an object-store location ends its key there; write it as %23"),
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


def test_an_object_store_write_is_locked_by_its_prefix_in_a_folder_of_this_user_alone(tmp_path, monkeypatch) -> None:
    # Keyed by the URI's text, `x?region=...` and `x` were two locks; and a lock folder another
    # user made (or opened) let a planted link have this process truncate the file it points to.
    import os
    import tempfile

    from embshard.datasets.outdir import _lock_file
    from embshard.errors import EnvironmentProblem

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    assert _lock_file(location("s3://b/a%7Eb")) == _lock_file(location("s3://b/a~b?region=us-east-1"))
    assert _lock_file(location("s3://b/a~b")) != _lock_file(location("s3://b/a~c"))
    folder = tmp_path / f"embshard-locks-{os.getuid()}"
    assert folder.stat().st_mode & 0o777 == 0o700
    folder.chmod(0o777)
    with pytest.raises(EnvironmentProblem, match=rf"^{folder}: the folder for the locks of object-store writes is "
                                                 "not this user's alone"):
        _lock_file(location("s3://b/x"))
