"""``python -m fedjax_sim.cli ...``: the ``fedjax-sim`` command."""

import sys

from fedjax_sim.cli import main

sys.exit(main())
