"""Session-wide test settings.

The ``rwmh`` command line turns on JAX's persistent compilation cache in the user's cache
directory (:mod:`rwmh.compilation_cache`). Tests call ``rwmh.cli.main`` in-process and in
subprocesses; they must neither write to the real user's cache nor change JAX's configuration
for the tests that follow, so the cache is off for the whole session. The tests of the cache
itself (``tests/test_compilation_cache.py``) turn it back on in their own subprocesses.
"""

import os

os.environ["RWMH_NO_COMPILATION_CACHE"] = "1"
