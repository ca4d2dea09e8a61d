"""The run's output directory: the resume guard (a run with another config is refused), the
resolved config it records, and opening or preparing it for a run (:mod:`refusal_dir.pipeline`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from refusal_dir.config import SPEED_ONLY_SETTINGS, Config, upgrade_stored_config
from refusal_dir.errors import OutputDirError, short_message
from refusal_dir.outdir import (
    atomic_write_bytes,
    claim_output_dir,
)


def config_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``section.field`` names whose values differ, ignoring :data:`SPEED_ONLY_SETTINGS`."""
    changed = []
    for section in sorted(set(previous) | set(current)):
        old, new = previous.get(section) or {}, current.get(section) or {}
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                changed.append(section)
            continue
        for name in sorted(set(old) | set(new)):
            key = f"{section}.{name}"
            if key not in SPEED_ONLY_SETTINGS and old.get(name) != new.get(name):
                changed.append(key)
    return changed


def check_resumable(output_dir: Path, config: Config) -> None:
    """Refuse (read-only, before anything is loaded) a directory holding another config's results."""
    resolved = Path(output_dir) / "config.resolved.yaml"
    if not resolved.is_file():
        return
    try:
        previous = yaml.safe_load(resolved.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise OutputDirError(
            f"{resolved} is corrupt ({short_message(error)}): pass --fresh to start over there, or "
            "choose a new --output-dir"
        ) from error
    if not isinstance(previous, dict):
        raise OutputDirError(
            f"{resolved} is corrupt (not a mapping of sections): pass --fresh to start over "
            "there, or choose a new --output-dir"
        )
    changed = config_changes(upgrade_stored_config(previous), config.to_dict())
    if changed:
        raise OutputDirError(
            f"{output_dir} holds results from a different config ({', '.join(changed)} "
            "changed): pass --fresh to start over there, or choose a new --output-dir"
        )


def record_config(output_dir: Path, config: Config) -> None:
    atomic_write_bytes(Path(output_dir) / "config.resolved.yaml", config.to_yaml().encode())


@contextlib.contextmanager
def open_output_dir(
    output_dir: Path,
    config: Config,
    *,
    fresh: bool = False,
    overwrite_config: bool = False,
    protect: Iterable[Path | str] = (),
) -> Iterator[Path]:
    """Claim the output directory for a run and hold its lock until the block ends.

    Validates it (:func:`refusal_dir.outdir.check_output_dir`), refuses one that holds
    results of another config, then with ``fresh`` empties it (a refusal-dir directory only).
    Call it after every other input was validated. ``overwrite_config`` (extraction) skips
    the config comparison and leaves recording the config to the caller.
    """
    with claim_output_dir(output_dir, fresh=fresh, protect=protect) as directory:
        if not overwrite_config:
            if not fresh:
                check_resumable(directory, config)
            if not (directory / "config.resolved.yaml").exists():
                record_config(directory, config)
        yield directory


def prepare_output_dir(
    output_dir: Path,
    config: Config,
    *,
    fresh: bool = False,
    overwrite_config: bool = False,
    protect: Iterable[Path | str] = (),
) -> Path:
    """:func:`open_output_dir` without holding the lock afterwards (each stage takes it again)."""
    with open_output_dir(
        output_dir, config, fresh=fresh, overwrite_config=overwrite_config, protect=protect
    ) as directory:
        return directory
