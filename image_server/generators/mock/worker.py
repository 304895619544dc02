"""A drawing process of the mock generator (started by ``mock.pool``, never by hand).

It reads jobs from stdin and answers on stdout, one at a time:

- job: 4-byte big-endian length, then a pickled ``Sketch`` (from the parent, trusted);
- answer: 1 status byte (0 ok, 1 error), 4-byte big-endian length, then the encoded image
  (ok) or the error text in UTF-8.

It ends when stdin reaches end of file, which is also what happens when the parent dies
in any way (the kernel closes the parent's end of the pipe), so it never outlives the
service. Signals a terminal or a supervisor sends to the whole process group are ignored
for the same reason: the parent decides when its drawing processes end.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import struct
import sys
from typing import BinaryIO

from image_server.generators.mock.render import Sketch, encoded

JOB_HEADER = struct.Struct(">I")
ANSWER_HEADER = struct.Struct(">BI")
OK, ERROR = 0, 1


def serve(jobs: BinaryIO, answers: BinaryIO) -> None:
    """Answer jobs until end of file on ``jobs``."""
    while True:
        header = jobs.read(JOB_HEADER.size)
        if len(header) < JOB_HEADER.size:
            return
        (size,) = JOB_HEADER.unpack(header)
        body = jobs.read(size)
        if len(body) < size:
            return
        try:
            sketch = pickle.loads(body)  # noqa: S301 - written by our own parent process
            if not isinstance(sketch, Sketch):
                raise TypeError(f"expected a Sketch, got {type(sketch).__name__}")
            status, payload = OK, encoded(sketch)
        except Exception as exc:  # the parent turns it into the job's error
            status, payload = ERROR, f"{type(exc).__name__}: {exc}".encode()
        answers.write(ANSWER_HEADER.pack(status, len(payload)))
        answers.write(payload)
        answers.flush()


def main(niceness: int = 0) -> None:
    if niceness:
        with contextlib.suppress(OSError):  # not permitted: normal priority then
            os.nice(niceness)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The answers get a private copy of stdout; fd 1 then points at stderr, so a stray print
    # (a library's warning) cannot corrupt the stream of answers.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    jobs = os.fdopen(0, "rb")
    try:
        serve(jobs, answers)
    except BrokenPipeError:  # the parent went away mid-answer: nothing left to flush
        os._exit(0)
    sys.exit(0)


if __name__ == "__main__":
    main()
