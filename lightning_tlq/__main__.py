"""``python -m lightning_tlq`` runs the ``lightning-tlq`` command line."""

from lightning_tlq.cli import main

main()
