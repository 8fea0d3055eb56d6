"""`python -m stylequeue` is the `stylequeue` command."""

from stylequeue.cli import main

main()
