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

FLOWER_LOGGER = "flwr"
"""Flower's logger, by name: common/ does not import Flower."""


def tame_flower_logging() -> None:
    """Call where Flower is loaded (the ServerApp, the ClientApp, the CLI): later handlers are untouched."""
    flower = logging.getLogger(FLOWER_LOGGER)
    flower.propagate = False
    colored = sys.stderr.isatty() and "NO_COLOR" not in os.environ
    for handler in flower.handlers:
        if hasattr(handler, "colored"):  # Flower's ConsoleHandler, as flwr's update_console_handler sets it
            handler.colored = colored
