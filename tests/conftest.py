"""Session-wide test settings.

The ``rwmh`` command line turns on JAX's persistent compilation cache in the user's cache
directory (:mod:`rwmh.compilation_cache`). Tests call ``rwmh.cli.main`` in-process and in
subprocesses; they must neither write to the real user's cache nor change JAX's configuration
for the tests that follow, so the cache is off for the whole session. The tests of the cache
itself (``tests/test_compilation_cache.py``) turn it back on in their own subprocesses.

A test run started in the background of a non-interactive shell (``bash .ci/run &``) inherits
SIGINT ignored, and so would every process the Ctrl-C tests start: Python then installs no
handler, the signals they send do nothing, and the runs they interrupt go on to the end (one
such run of ``.ci/run`` failed every Ctrl-C test and hung in ``sigint_worker.py``). Python's
own handler here gives the session, and the processes it starts, what a terminal gives.
"""

import os
import signal

os.environ["RWMH_NO_COMPILATION_CACHE"] = "1"

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
