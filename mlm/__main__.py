"""`python -m mlm ...`: the same as the `mlm` command (Ray jobs use this entry)."""

from mlm.cli import main

main()
