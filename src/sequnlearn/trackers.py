"""Optional experiment trackers (tensorboard, wandb), checked when a run starts.

accelerate leaves out a tracker whose package is missing without a word; we stop with the
install command instead, before anything is written.
"""

from __future__ import annotations

import importlib

from sequnlearn.errors import UserError

#: tracker → (module it needs, pip extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "sequnlearn[tensorboard]"), "wandb": ("wandb", "sequnlearn[wandb]")}


def check_tracker(name: str | None) -> None:
    """Check that the package of tracker ``name`` imports (``None``: no tracker, nothing to check).

    Raises:
        UserError: unknown tracker, or its package is not installed (the message gives the command).
    """
    if name is None:
        return
    if name not in TRACKERS:
        raise UserError(f"report_to {name!r} is not valid; use one of {', '.join(TRACKERS)}")
    module, extra = TRACKERS[name]
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(f"--report-to {name} needs the {module} package, which is not installed; "
                        f"pip install '{extra}'") from None


def open_tracker(name: str, run_name: str, logging_dir, config: dict):
    """Start tracker ``name`` for a run (main process only) and store its config.

    Returns:
        An accelerate tracker: ``log(values, step)`` and ``finish()``. Tensorboard writes its events
        under ``logging_dir/run_name``.
    """
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    check_tracker(name)
    cls = LOGGER_TYPE_TO_CLASS[name]
    tracker = cls(run_name, str(logging_dir)) if cls.requires_logging_directory else cls(run_name)
    tracker.start()
    tracker.store_init_configuration(config)
    return tracker
