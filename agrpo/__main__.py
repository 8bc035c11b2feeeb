"""`python -m agrpo ...` is `agrpo ...`."""

import sys

from agrpo.cli import main

sys.exit(main())
