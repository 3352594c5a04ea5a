"""The ``lightning-tlq`` command line (jsonargparse): ``lightning-tlq calibrate --config FILE``.

Every argument of :func:`lightning_tlq.calibrate.calibrate` is a flag (``--quant.bits 3``) or a YAML key;
``--print_config`` prints the resolved configuration.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-tlq`` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from jsonargparse import auto_cli
    from transformers.utils import logging as hf_logging

    from lightning_tlq.calibrate import calibrate
    from lightning_tlq.export import export  # lightning-tlq export DIR: the compressed-tensors checkpoint

    hf_logging.disable_progress_bar()  # keep the summary readable
    commands = {"calibrate": calibrate, "export": export}
    auto_cli(commands, args=list(argv) if argv is not None else None, as_positional=False)


if __name__ == "__main__":
    main()
