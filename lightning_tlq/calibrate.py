"""``lightning-tlq calibrate`` as a Fabric entry script, and the Python API :func:`calibrate`.

``fabric run ... <package dir>/calibrate.py --config FILE`` or ``torchrun ... -m lightning_tlq.calibrate --config
FILE`` (see ``examples/multinode/``) run the ``calibrate`` subcommand in every process the launcher started.
"""

from lightning_tlq.run_calibration import calibrate

__all__ = ["calibrate"]

if __name__ == "__main__":
    import sys

    from lightning_tlq.cli import main

    main(["calibrate", *sys.argv[1:]])
