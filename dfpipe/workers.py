"""Worker processes that end with their parent.

The stages' process pools (stage 1's decoders, stage 2's generators, stage 3's decode workers) are spawned
children. A killed stage (SIGKILL, OOM killer, a closed terminal) runs no clean-up, and its workers would live
on with parent PID 1, holding memory and the pool's resource tracker alive. :func:`exit_with_parent`, called in a
pool's initializer, gives each worker a daemon thread that ends it once its parent is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

POLL_S = 0.5  # how often a worker looks for its parent: a killed stage's workers end within this


def exit_with_parent(poll_s: float = POLL_S) -> None:
    """In a worker process: end it (``os._exit``) as soon as the process that started it has died.

    The parent is ``multiprocessing.parent_process()`` (known before the worker ran any code), so a parent that
    died while the worker was starting is caught too. Polls ``os.getppid()``: Linux's ``PR_SET_PDEATHSIG`` fires
    when the parent *thread* ends, which a pool started from a short-lived thread would trip."""
    parent = multiprocessing.parent_process()
    if parent is None:  # not a multiprocessing child: nothing to watch
        return
    ppid = parent.pid

    def watch() -> None:
        while os.getppid() == ppid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
