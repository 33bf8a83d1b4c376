"""pytest set-up shared by every test file: one intra-op thread.

The tests run tiny models, far too small for intra-op parallelism: on a 2-core machine that is also
running anything else, two OpenMP workers mostly spin (a 20-step tiny run took 9-13 s on one thread
and 74-75 s on two while other jobs ran). OMP_NUM_THREADS also reaches the subprocesses the tests start
(notebook kernels, torchrun, `python dipp.py`).
"""
import os

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402

torch.set_num_threads(1)
