"""`python -m hinge_cli`: the same CLI, for launchers such as `torchrun -m`."""

from hinge_cli.cli.app import main

main()
