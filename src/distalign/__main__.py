"""``python -m distalign`` (also what ``accelerate launch -m distalign`` runs)."""

import sys

from distalign.cli import main

sys.exit(main())
