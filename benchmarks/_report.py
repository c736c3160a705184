"""What every benchmark's JSON holds besides its rows: the arguments and the machine it ran on."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch


def write_json(path: Path, args: argparse.Namespace, rows: list, **extra) -> None:
    """``{"args", "machine", "rows", **extra}`` to ``path`` (folders made as needed)."""
    import sata

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "load": os.getloadavg(), "kernels": sata._kernels.status()},
        "rows": rows, **extra}, indent=1))
