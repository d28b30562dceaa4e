"""`python -m loadtest` is `lorahive-loadtest`."""

from loadtest.cli import main

if __name__ == "__main__":
    main()
