"""``python -m gdistill`` (also what ``torchrun -m gdistill`` runs)."""

import sys

from gdistill.cli import main

sys.exit(main())
