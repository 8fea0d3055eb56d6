"""`python -m stylequeue` is the `stylequeue` command."""

from stylequeue.cli import main

# Guarded: the worker's codec processes are spawned, and spawn imports the parent's main module.
if __name__ == "__main__":
    main()
