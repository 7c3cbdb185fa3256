"""Tables and plots for a run, an ensemble job or a sweep, written into DIR/report/.

    python jobs/report.py DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

import rayexperts.cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(rayexperts.cli.run_job("report"))
