"""A rented GPU box from bare to benchmarked in one command: `python deploy_vast.py --all`
(`--help` lists the steps; docs/deploy.md says what each does). The code is
csm_streaming/deploy/ (command.py); this face only starts it, with the system's Python."""

import sys

from csm_streaming.deploy.command import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
