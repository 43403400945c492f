"""Flower's log lines once, and in colour only on a terminal.

Opacus calls ``logging.basicConfig`` when imported, which gives the root logger a handler; Flower's logger has its
own console handler and also propagates to the root, so every Flower line (ours among them: the ServerApp logs
through it) was printed twice, the second time with a date prefix. And Flower colours its level names whether or
not anyone reads them on a terminal, which leaves escape codes in logs and pipes.
"""

from __future__ import annotations

import logging
import os
import sys


def tame_flower_logging() -> None:
    from flwr.supercore.logger import LOGGER_NAME, update_console_handler

    logging.getLogger(LOGGER_NAME).propagate = False
    update_console_handler(colored=sys.stderr.isatty() and "NO_COLOR" not in os.environ)
