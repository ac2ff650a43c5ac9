"""`first_line`: what a one-line error keeps of an exception."""

from __future__ import annotations

from embshard.errors import first_line


def test_the_first_line_of_a_plain_message_with_its_type() -> None:
    assert first_line(ValueError("bad id 7 in C3\nmore detail")) == "ValueError: bad id 7 in C3"
    assert first_line(KeyError()) == "KeyError: "


def test_a_message_that_introduces_a_list_keeps_its_first_item() -> None:
    # load_state_dict's error said only "Error(s) in loading state_dict for DLRM:".
    e = RuntimeError("Error(s) in loading state_dict for DLRM:\n\tsize mismatch for w: shape [4] vs [8].\n\tmore")
    assert first_line(e) == ("RuntimeError: Error(s) in loading state_dict for DLRM: size mismatch for w: shape [4] "
                             "vs [8].")
    assert first_line(ValueError("ends with a colon:")) == "ValueError: ends with a colon:"
    many = RuntimeError("Error(s) in loading state_dict for M:\n\tMissing key(s) in state_dict: " + '"k", ' * 300)
    assert len(first_line(many)) < 300 and first_line(many).endswith("…")  # one line, not every key


def test_a_message_carrying_a_remote_traceback_keeps_the_exception_raised_there() -> None:
    # What Ray's job SDK raises for a job server's HTTP 500: the server's traceback after a prefix.
    reply = RuntimeError(
        "Request failed with status code 500: Traceback (most recent call last):\n"
        '  File "/ray/dashboard/modules/job/job_head.py", line 360, in submit_job\n'
        "    resp = await job_agent_client.submit_job_internal(submit_request)\n"
        "ray.exceptions.RpcError: the agent on node 1a2b went away\n"
    )
    assert first_line(reply) == ("RuntimeError: Request failed with status code 500: "
                                 "ray.exceptions.RpcError: the agent on node 1a2b went away")
    assert first_line(RuntimeError("Traceback (most recent call last):")) == \
        "RuntimeError: Traceback (most recent call last):"


def test_a_full_disk_under_a_writer_that_names_no_file_is_one_line() -> None:
    # A full disk under pyarrow's Parquet writer, and numpy's short write, were tracebacks. Each
    # exception is as that library raised it on a full tmpfs (neither names the file).
    from embshard.errors import EnvironmentProblem, environment_problem

    pyarrow_full = OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    problem = environment_problem(pyarrow_full)
    assert isinstance(problem, EnvironmentProblem)
    assert str(problem) == ("No space left on device (OSError: [Errno 28] Error writing bytes to file. "
                            "Detail: [errno 28] No space left on device)")
    assert str(environment_problem(OSError("93145 requested and 7664 written"))) == \
        "a file was written short (93145 requested and 7664 written): is the disk full?"
    assert environment_problem(OSError("something else")) is None
    assert environment_problem(OSError(13, "Permission denied")) is None  # no file: maybe a store's, retried
