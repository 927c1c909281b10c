"""Follow a run's published critic versions by tailing ``RUN_DIR/versions/registry.jsonl``.

The registry (``actors/registry.py``) appends one fsynced JSON line per published ``WeightVersion``
before ``publish`` returns, so the file alone says which versions exist, for a running run and a
finished one, from any process and without a Ray actor handle. ``RegistryTail.poll()`` reads only the
bytes appended since the last call:

* a last line without its newline is a publish still being written: it is left for the next poll;
* a line that does not decode is logged once and skipped (the registry itself refuses such files);
* a file that shrank (a resumed run cut off a torn last line) is read again from the start; versions
  the caller already has are filtered out by number.

Version 0 is the run's seed and is never in the file. Ray-free, so it is testable in-process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

from scrit.messages import WeightVersion

__all__ = ["RegistryTail", "resolve_uri", "run_seed_model"]

log = logging.getLogger(__name__)


class RegistryTail:
    """Incremental reader of one registry file; ``poll()`` returns the versions appended since last time."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        from scrit.actors.registry import registry_path

        self.run_dir = Path(run_dir)
        self.path = registry_path(self.run_dir)
        self._offset = 0
        self._partial = b""
        self._decoder = msgspec.json.Decoder(WeightVersion)
        self.bad_lines = 0

    def poll(self) -> list[WeightVersion]:
        """Versions appended since the previous call, oldest first (absolute URIs)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []  # no version published yet (or the run has not created its directory)
        if size < self._offset:  # the file was cut (a resumed run dropped a torn line): start over
            log.warning("%s shrank from %d to %d bytes; reading it again", self.path, self._offset, size)
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return []
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when the data ended with a newline
        out = []
        for line in lines:
            if not line.strip():
                continue
            try:
                version = self._decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as error:
                self.bad_lines += 1
                log.error("%s: skipping a line that is not a WeightVersion: %s", self.path, error)
                continue
            out.append(msgspec.structs.replace(version, uri=resolve_uri(version.uri, self.run_dir)))
        return out


def resolve_uri(uri: str, run_dir: str | os.PathLike[str]) -> str:
    """An absolute checkpoint path for ``uri``.

    The trainer records absolute paths; a relative one (written by a driver in another working
    directory) is taken relative to the run's ``versions/`` directory when that is where it exists.
    """
    path = Path(uri)
    if path.is_absolute() or uri.startswith(("http://", "https://")):
        return uri
    if path.exists():
        return str(path.resolve())
    candidate = Path(run_dir) / "versions" / path.name
    return str(candidate.resolve()) if candidate.exists() else uri


def run_seed_model(run_dir: str | os.PathLike[str]) -> str:
    """The model a run started from (its version 0): ``critic.model`` in the run's ``config.yaml``.

    Falls back to ``summary.json``'s ``seed_model`` and finally to the shipped seed.
    """
    import json

    root = Path(run_dir)
    config_file = root / "config.yaml"
    if config_file.is_file():
        from scrit.config import ConfigError, load_config

        try:
            return load_config(config_file).critic.model
        except ConfigError as error:
            log.warning("cannot read %s (%s); looking for summary.json", config_file, error)
    summary = root / "summary.json"
    if summary.is_file():
        try:
            seed = json.loads(summary.read_text(encoding="utf-8")).get("seed_model")
        except (OSError, ValueError):
            seed = None
        if seed:
            return str(seed)
    return "seed"
