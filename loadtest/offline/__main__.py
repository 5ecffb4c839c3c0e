"""`python -m loadtest.offline`: the offline benchmark (loadtest/offline/bench.py)."""

import sys

argv = sys.argv[1:]
if argv[:2] == ["--mode", "burst"]:  # its own knobs (loadtest/offline/burst.py)
    from loadtest.offline.burst import main as burst_main

    burst_main(argv[2:])
else:
    from loadtest.offline.bench import main

    main(argv)
