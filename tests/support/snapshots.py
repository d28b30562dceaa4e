"""A directory tree's contents, to compare before and after (an adapter store that must be left as it was)."""

from __future__ import annotations

from pathlib import Path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (None for directories) with its contents, the lock file aside."""
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.name != ".lock"
    }
