"""Tables and plots for a run, an ensemble job or a sweep, written into DIR/report/.

    python jobs/report.py DIR
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from any directory, installed or not

from rayexperts.report import write_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(prog="jobs/report.py", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="a run directory, an ensemble job directory or a sweep directory")
    args = parser.parse_args()
    try:
        md = write_report(args.dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
