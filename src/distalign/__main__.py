"""``python -m distalign`` (also what ``accelerate launch -m distalign`` runs)."""

from distalign.cli import main
from distalign.train.distributed import exit_process

exit_process(main())
