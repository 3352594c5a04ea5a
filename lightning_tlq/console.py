"""Console output of the command line: our log lines above the progress bars, Lightning's start-up lines silenced."""

from __future__ import annotations

import logging

_LOGGER_NAMES = ("lightning_tlq",)


class _TqdmHandler(logging.StreamHandler):
    """Writes log lines with ``tqdm.write`` so they appear above active progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise
            self.handleError(record)


def configure_logging(quiet: bool) -> None:
    """Our log lines go above the progress bars (``--quiet true``: warnings only); Lightning's own start-up lines
    (the "GPU available / TPU" banner, logger tips) are not shown: the subcommands report their devices
    themselves."""
    for name in _LOGGER_NAMES:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
            handler = _TqdmHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.WARNING if quiet else logging.INFO)
    quiet_lightning()


def quiet_lightning() -> None:
    """Silence Lightning's informational start-up lines (banner, tips) on every rank."""
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
        "lightning.pytorch.utilities.seed",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
