"""The project's settings with the django-q2 poll interval taken from ``BENCH_Q_POLL`` (``bench/queue.py --poll``).

Only for benchmarks: it shows what another ``Q_CLUSTER["poll"]`` would change without editing the project.
"""
import os

from lightx2v_site.settings import *  # noqa: F401,F403
from lightx2v_site.settings import Q_CLUSTER

Q_CLUSTER = {**Q_CLUSTER, "poll": float(os.environ.get("BENCH_Q_POLL", Q_CLUSTER["poll"]))}
