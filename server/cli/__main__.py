"""`python -m server.cli`: the `lorahive` command."""

from server.cli import main

main()
