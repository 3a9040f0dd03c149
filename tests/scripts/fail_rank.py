"""Rank 1 fails at once with exit code 3; rank 0 writes its pid and sleeps: the launcher must stop it."""
import os
import sys
import time

if os.environ["RANK"] == "1":
    time.sleep(1)
    print("rank 1 gives up", file=sys.stderr, flush=True)
    sys.exit(3)
with open(sys.argv[-1], "w") as f:
    f.write(str(os.getpid()))
time.sleep(300)
