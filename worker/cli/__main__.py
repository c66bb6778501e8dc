"""`python -m worker.cli`: the same command line as `videoqa`."""

from worker.cli.main import main

main()
