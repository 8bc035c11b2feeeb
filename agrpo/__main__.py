"""`python -m agrpo ...` is `agrpo ...`."""

from agrpo.cli import entry

entry()
