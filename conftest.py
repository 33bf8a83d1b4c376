"""pytest set-up shared by every test file: one intra-op thread; file_size_limit for tests of a full disk; the
grouping and order of the tests on pytest-xdist's two workers; DIPP_TEST_CPU_LOG, each test's CPU-seconds.

The tests run tiny models, far too small for intra-op parallelism: on a 2-core machine that is also
running anything else, two OpenMP workers mostly spin (a 20-step tiny run took 9-13 s on one thread
and 74-75 s on two while other jobs ran). OMP_NUM_THREADS also reaches the subprocesses the tests start
(notebook kernels, torchrun, `python dipp.py`).
"""
import contextlib
import json
import os
import resource
import signal
import sys
import time

os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
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


# ----------------------------------------------------------------------------- parallel runs (pytest-xdist)
# pytest.ini runs the tests in 2 worker processes (`-n 2 --dist loadgroup`). A helper cached with
# functools.lru_cache computes its result once per process, so the tests that share an expensive one go to one
# worker together, as one xdist_group, and it is still computed once. SHARED names those helpers (or module
# globals) per test file; a test that reaches two of them, directly or through the file's other functions, joins
# their groups into one. The cheap caches (the random-weight folders, shared on disk under a lock) are not here.
SHARED = {"test_dipp.py": ("executed_notebook", "offline_imagereward"),  # notebook 01 runs the quick toy
          "test_evaluate.py": ("readme_run", "pixart_run"),
          "test_export.py": ("lora_run",),  # one LoRA step per family, read by all of its tests
          "test_toy.py": ("DIGITS_CACHE",),  # its notebook test reads the teacher that the run before it trained
          "test_cost.py": ("iteration", "parts", "counted_memory"),  # cached FLOP and memory counts
          "test_reproduce.py": ("tiny_chain",)}


def names_reached(function, module, seen=None):
    """The global names a function refers to, through the functions of its own module that it calls."""
    seen = set() if seen is None else seen
    codes = [getattr(function, "__wrapped__", function).__code__]
    while codes:
        code = codes.pop()
        codes += [c for c in code.co_consts if isinstance(c, type(code))]  # lambdas and inner functions
        for name in set(code.co_names) - seen:
            seen.add(name)
            helper = getattr(module, name, None)
            if callable(helper) and getattr(helper, "__module__", None) == module.__name__ and hasattr(
                    getattr(helper, "__wrapped__", helper), "__code__"):
                names_reached(helper, module, seen)
    return seen


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    parent = {}  # union-find over the shared names: one group per connected set

    def root(name):
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name
    used = {}
    for item in items:
        shared = SHARED.get(os.path.basename(str(item.fspath)), ())
        function = getattr(item, "function", None)
        if shared and function is not None:
            used[item] = sorted(set(shared) & names_reached(function, item.module))
            for name in used[item][1:]:
                parent[root(name)] = root(used[item][0])
    for item, names in used.items():
        if names:
            item.add_marker(pytest.mark.xdist_group(root(names[0])))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # longest first, so that no long test starts last while the other
        items.sort(key=lambda item: not item.name.startswith(LONGEST))  # worker idles (stable: else file order)


# The slowest tests outside the groups (docs/tests.md: 30-65 s each on an idle core). xdist hands out the groups
# first (largest first), then single tests in collection order: these go to the front of that order.
LONGEST = ("test_two_process_ddp_equals_one_process", "test_compile_is_the_same_math",
           "test_sdxl_compile_and_benchmark", "test_two_fsdp_processes", "test_tiny_chain")
# (PixArt-α's and SDXL's 2-process tests left it when their processes were forked instead of started by torchrun:
# 2-4 CPU-seconds each, docs/tests.md)


def pytest_configure(config):
    """One line instead of a silent split: pytest-xdist <= 3.8 marks a test's group by rewriting its node id, which
    pytest 9.2 no longer reads (pytest-xdist issue #1386), so each grouped test would go to any worker."""
    if config.getoption("dist", "no") != "loadgroup":
        return
    from importlib.metadata import version
    xdist = version("pytest-xdist")
    if tuple(map(int, xdist.split(".")[:2])) <= (3, 8) and pytest.version_tuple[:2] >= (9, 2):
        raise pytest.UsageError(f"pytest {pytest.__version__} breaks pytest-xdist {xdist}'s --dist loadgroup: "
                                "pip install -r requirements.txt (pytest 9.1.1), or run with -n 0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """DIPP_TEST_CPU_LOG=FILE: one JSON line per test with its CPU-seconds (this process and the children it
    waited for: torchrun, notebook kernels, subprocesses) and wall seconds, for docs/tests.md's timings."""
    path = os.environ.get("DIPP_TEST_CPU_LOG")
    cpu = lambda: sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                      for f in ("ru_utime", "ru_stime"))
    start, wall = cpu(), time.perf_counter()
    yield
    if path:
        with open(path, "a") as log:  # each line is one short write: two workers can share the file
            log.write(json.dumps(dict(test=item.nodeid, cpu_s=round(cpu() - start, 2), wall_s=round(
                time.perf_counter() - wall, 2), worker=os.environ.get("PYTEST_XDIST_WORKER", "main"))) + "\n")
