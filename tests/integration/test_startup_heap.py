"""A serving process freezes its start-up heap, so full garbage collections stop walking it.

Under load a full collection walked the hundreds of thousands of objects start-up made for 40-90 ms while
every call in flight waited (``app.tune_garbage_collection``). Here a real server is started by
``run_server``, as ``serve`` starts it, in a process of its own; when it reports that it serves, its start-up
heap is frozen and its young generation is collected less often than Python's default.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

_SERVE = textwrap.dedent(
    """
    import asyncio, gc, os, signal, sys
    from pathlib import Path
    from posguard_server.app import run_loop, run_server
    from posguard_server.config import Settings

    settings = Settings(data_dir=Path(sys.argv[1]), listen="127.0.0.1:0", insecure_no_auth=True,
                        metrics_enabled=False, console_enabled=False)
    before = gc.get_freeze_count()

    def serving(port):
        print(before, gc.get_freeze_count(), gc.get_threshold()[0], flush=True)
        # Stop as an operator would, once run_server has set up its signal handlers (right after this).
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)

    run_loop(settings, run_server(settings, serving=serving))
    """
)


def test_a_server_tunes_its_garbage_collection_before_it_reports_serving(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SERVE, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, after, young = (int(n) for n in done.stdout.split())
    assert before == 0
    assert young > 700
    # The start-up heap: the service's modules and the gRPC and SQLAlchemy objects it built.
    assert after > 50_000
