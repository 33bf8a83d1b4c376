"""pytest set-up shared by every test file: one intra-op thread; file_size_limit for tests of a full disk.

The tests run tiny models, far too small for intra-op parallelism: on a 2-core machine that is also
running anything else, two OpenMP workers mostly spin (a 20-step tiny run took 9-13 s on one thread
and 74-75 s on two while other jobs ran). OMP_NUM_THREADS also reaches the subprocesses the tests start
(notebook kernels, torchrun, `python dipp.py`).
"""
import contextlib
import os
import resource
import signal
import sys

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)


@contextlib.contextmanager
def file_size_limit(nbytes):
    """A real write failure, in-process: inside the block the kernel refuses to grow any regular file past nbytes
    (RLIMIT_FSIZE) and the write fails with EFBIG, as a full disk fails it with ENOSPC (SIGXFSZ, which would kill
    the process, is ignored). The test's own output goes to /dev/null meanwhile, which no limit applies to:
    pytest captures it into a file that could hit the limit too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    sys.stdout.flush(), sys.stderr.flush()
    saved, null = [os.dup(1), os.dup(2)], os.open(os.devnull, os.O_WRONLY)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            os.dup2(null, 1), os.dup2(null, 2)
            resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
            try:
                yield
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)
        signal.signal(signal.SIGXFSZ, handler)
