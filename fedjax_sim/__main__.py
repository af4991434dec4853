"""``python -m fedjax_sim ...``: the ``fedjax-sim`` command (``fedjax_sim.cli:main``), with
the same arguments, output and exit status."""

from __future__ import annotations

import sys

from fedjax_sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
