"""`python -m artloop.cli ...` (e.g. under `accelerate launch`) is `artloop ...`."""

from artloop.cli.main import main

main()
