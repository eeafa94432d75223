"""mgr: the time-to-quality harness (FLOPs estimator, budgets, artifacts, CLI)."""

import os
import time

# When the process first imported mgr: the launcher start-up term of the decomposition (imports of JAX and the
# demo, device selection, argument parsing) runs from here to mgr.launcher.launch.
IMPORTED_AT = time.perf_counter()

# On CPU, JAX runs SVD/QR/Cholesky through scipy's OpenBLAS, loaded at the first such call. Its worker threads
# spin against XLA's own thread pool: on a 2-core machine a 512x2048 SVD took 0.4-1 s (once 24 s) instead of
# 0.12 s single-threaded. It must be set before that library loads; an explicit user setting wins. GPUs use cuSOLVER.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
