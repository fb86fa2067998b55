"""Output helpers shared by the ``rfmpc`` subcommands."""

from __future__ import annotations

import json

__all__ = ["emit"]


def emit(obj: dict, as_json: bool) -> None:
    """One JSON object on a line (``--json``), else ``key: value`` lines."""
    if as_json:
        print(json.dumps(obj))
    else:
        for k, v in obj.items():
            print(f"{k}: {v}")
