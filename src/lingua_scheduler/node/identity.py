"""The node's persisted identity: the id the scheduler gave it and its token, in a file only its owner
can read (0600, in a 0700 directory when the SDK creates it).

A node keeps its id across restarts, so the scheduler gives it its record back (and, with node
authentication, recognises its token instead of asking for the enrollment secret again). The file is
written whole to a temporary file and renamed over the old one: a crash never leaves half an identity.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

#: file name of the default identity file, under the user's state directory
DEFAULT_NAME = "node.json"


def default_path() -> Path:
    """``$XDG_STATE_HOME/lingua-node/node.json``, else ``~/.local/state/lingua-node/node.json``."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lingua-node" / DEFAULT_NAME


class _Stored(msgspec.Struct, omit_defaults=True):
    node_id: str
    node_token: str | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: str
    node_token: str | None = None


class IdentityStore:
    """Reads and writes one identity file."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()

    def load(self) -> Identity | None:
        """The stored identity; None when there is none yet. A file that cannot be read as an identity
        raises ``ValueError`` naming the file (a node must not silently enrol as a new node)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            stored = msgspec.json.decode(data, type=_Stored)
        except msgspec.ValidationError as exc:
            raise ValueError(f"{self.path} is not a node identity file (node_id, node_token)") from exc
        except msgspec.DecodeError as exc:
            raise ValueError(f"{self.path} is not JSON: fix or remove it") from exc
        return Identity(stored.node_id, stored.node_token)

    def save(self, identity: Identity) -> None:
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(parents=True, mode=0o700)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an older temporary file may have other permissions
            os.write(fd, msgspec.json.encode(_Stored(identity.node_id, identity.node_token)))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
