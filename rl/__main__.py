"""`python -m rl ...` (and `accelerate launch -m rl train ...`) runs the looprl CLI."""

import sys

from rl.cli import main

sys.exit(main())
