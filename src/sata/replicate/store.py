"""Results on disk, one JSON file per finished unit of work, so an interrupted run keeps them
and ``--resume`` continues where it stopped."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..bench.timing import write_json

__all__ = ["ResumeMismatch", "Store"]


class ResumeMismatch(ValueError):
    """``--resume`` on an output directory written with other settings."""


class Store:
    """``out/parts/<key>.json`` per unit; ``out/parts/_config.json`` records the settings."""

    def __init__(self, out: str | os.PathLike, config: dict, resume: bool):
        self.out = Path(out)
        self.parts = self.out / "parts"
        cfg_file = self.parts / "_config.json"
        if resume and cfg_file.exists():
            old = json.loads(cfg_file.read_text())
            if old != json.loads(json.dumps(config)):
                diff = sorted(k for k in set(old) | set(config) if old.get(k) != json.loads(json.dumps(config)).get(k))
                raise ResumeMismatch(
                    f"--resume: {self.out} was written with other settings ({', '.join(diff)} differ); "
                    "rerun with the same flags, or without --resume to start over")
        elif self.parts.exists():  # a fresh run: forget earlier parts, only ever the store's own files
            if not cfg_file.exists() and any(self.parts.iterdir()):
                raise ResumeMismatch(
                    f"{self.parts} exists but was not written by sata replicate (it has no _config.json): choose "
                    "another --out, or move that folder away")
            for p in self.parts.glob("*.json"):
                p.unlink()
        self.parts.mkdir(parents=True, exist_ok=True)
        write_json(cfg_file, config)

    def _path(self, key: str) -> Path:
        return self.parts / f"{key.replace('/', '__')}.json"

    def has(self, key: str) -> bool:
        return self._path(key).exists()

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        return json.loads(p.read_text()) if p.exists() else None

    def put(self, key: str, value: dict) -> None:
        write_json(self._path(key), value)

    def all(self, prefix: str) -> dict[str, dict]:
        """Every stored unit whose key starts with ``prefix``, by key."""
        tag = prefix.replace("/", "__")
        out = {}
        for p in sorted(self.parts.glob(f"{tag}*.json")):
            out[p.stem.replace("__", "/")] = json.loads(p.read_text())
        return out
