"""The audit log: one JSON line per admin action or model promotion, appended, never rewritten."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def append_audit(path: Path, action: str, actor: str, **details: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"time": time.time(), "action": action, "actor": actor, **details}) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def read_audit(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
