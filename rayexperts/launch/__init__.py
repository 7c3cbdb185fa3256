"""Config → Ray objects: a Train run (``train``), a config's prerequisite runs then its own (``stages``), a
two-stage CBD job (``ensemble``), a Tune sweep (``tune``), a published table re-run (``reproduce``), connecting to a
cluster (``cluster``).

Ray prints a worker's lines on the driver and folds lines that look alike across processes into one
("[repeated 2x across cluster]"); that would fold the progress lines of teachers training side by side.
The flag is read when ray is imported, so it is set here, before any launch module imports ray.
"""

import os

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
