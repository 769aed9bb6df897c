"""Shared test setup.

The tests use tiny models, where torch's intra-op threads cost more than they give (and on a
shared 2-core machine they spin against each other), so every test process and every subprocess
it starts runs single-threaded. Set before torch is imported anywhere.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
