"""`python -m loadtest.offline`: the offline benchmark (loadtest/offline/bench.py)."""

import sys

from loadtest.offline.bench import main

main(sys.argv[1:])
