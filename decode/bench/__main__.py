"""`python -m decode.bench ...`: see decode/bench/cli.py."""

import sys

from decode.bench.cli import main

sys.exit(main())
