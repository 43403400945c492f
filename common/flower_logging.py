"""Flower's log lines once, and in colour only on a terminal.

Opacus calls ``logging.basicConfig`` when imported, which gives the root logger a handler; Flower's logger has its
own console handler and also propagates to the root, so every Flower line (ours among them: the ServerApp logs
through it) was printed twice, the second time with a date prefix. And Flower colours its level names whether or
not anyone reads them on a terminal, which leaves escape codes in logs and pipes.

Where Flower loads, so does its simulation engine: Ray's driver (the ``fedaug`` process, or ``flwr run``'s simulation
process, which imports the ClientApp before it starts Ray) prints a FutureWarning tip once; see
``tame_flower_logging``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

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
    # Ray's tip that a later Ray will stop hiding GPUs from actors that ask for none. fedaug wants today's behaviour
    # (a simulated merchant given no GPU trains on the CPU), so there is nothing to act on; Ray's own off switch,
    # RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0, would instead show every GPU to every CPU-only merchant.
    warnings.filterwarnings("ignore", message=RAY_GPU_TIP, category=FutureWarning)


RAY_GPU_TIP = "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices"
