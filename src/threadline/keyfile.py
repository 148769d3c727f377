"""API keys: the key file (``THREADLINE_API_KEYS_FILE``) that ``threadline keys`` writes and
the server reads.

A key is ``tl_`` and 32 random bytes (URL-safe base64). The file holds only its SHA-256 hex
digest: a 256-bit random token cannot be guessed, so a slow hash would protect nothing that a
fast one does not, and the fast one lets the server find a key by its digest in O(1) on every
request. A leaked file thus reveals names, roles and users, never a usable key.

The file is TOML (or JSON, by its ``.json`` suffix), one entry per key::

    [[keys]]
    name = "alice-laptop"            # unique; names the key in logs and rate limits
    hash = "9f86d0..."               # sha256 hex of the key
    role = "user"                    # "admin" (everything) or "user" (only user_id's data)
    user_id = "alice"                # required for role "user"
    rate_limit_per_min = 60          # 0: no limit
    created_at = "2026-11-30T15:14:00Z"

Nothing here does I/O on import; reading and writing are blocking calls (run them off the
event loop, as ``api/gate.py`` does).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from threadline.errors import ConfigError

Role = Literal["admin", "user"]
ROLES: tuple[Role, ...] = ("admin", "user")
PREFIX = "tl_"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One entry of the key file: everything about a key but the key itself."""

    name: str
    hash: str
    role: Role
    user_id: str | None = None
    rate_limit_per_min: int = 0
    created_at: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a key needs a name")
        if self.role not in ROLES:
            raise ValueError(
                f"key {self.name!r}: role must be 'admin' or 'user', not {self.role!r}"
            )
        if self.role == "user" and not self.user_id:
            raise ValueError(f"key {self.name!r}: a user key needs a user_id")
        if self.role == "admin" and self.user_id is not None:
            raise ValueError(f"key {self.name!r}: an admin key has no user_id")
        if len(self.hash) != 64 or any(c not in "0123456789abcdef" for c in self.hash):
            raise ValueError(f"key {self.name!r}: hash must be 64 lowercase hex digits")
        if self.rate_limit_per_min < 0:
            raise ValueError(f"key {self.name!r}: rate_limit_per_min must be >= 0")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def read_keys(path: Path) -> list[ApiKey]:
    """The entries of a key file; a missing file has none. Raises ``ConfigError``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read API keys file {str(path)!r}: {exc}") from None
    try:
        document: Any = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"API keys file {str(path)!r} is not valid: {exc}") from None
    entries = document.get("keys", []) if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"API keys file {str(path)!r}: expected a list under 'keys'")
    keys: list[ApiKey] = []
    try:
        for entry in entries:
            if not isinstance(entry, dict):
                raise ValueError(f"expected a table per key, got {entry!r}")
            keys.append(ApiKey(**entry))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"API keys file {str(path)!r}: {exc}") from None
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise ConfigError(f"API keys file {str(path)!r}: key names must be unique")
    return keys


def write_keys(path: Path, keys: Sequence[ApiKey]) -> None:
    """Replace the file atomically (a server reloading it never reads half of it)."""
    text = _json(keys) if path.suffix == ".json" else _toml(keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_key(
    path: Path,
    *,
    role: Role,
    user_id: str | None,
    rate_limit_per_min: int = 0,
    name: str | None = None,
) -> tuple[str, ApiKey]:
    """Add a new key to the file; return the key (shown once, never stored) and its entry."""
    keys = read_keys(path)
    key = generate_key()
    if name is None:
        name = f"{user_id or 'admin'}-{secrets.token_hex(3)}"
    if any(k.name == name for k in keys):
        raise ConfigError(f"a key named {name!r} exists already")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        entry = ApiKey(name, hash_key(key), role, user_id, rate_limit_per_min, now)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    write_keys(path, [*keys, entry])
    return key, entry


def revoke_key(path: Path, name: str) -> ApiKey:
    """Remove the key named ``name`` from the file; raises ``ConfigError`` if there is none."""
    keys = read_keys(path)
    found = [k for k in keys if k.name == name]
    if not found:
        raise ConfigError(f"no key named {name!r} in {str(path)!r}")
    write_keys(path, [k for k in keys if k.name != name])
    return found[0]


def _json(keys: Iterable[ApiKey]) -> str:
    return json.dumps({"keys": [_fields(k) for k in keys]}, indent=2) + "\n"


def _toml(keys: Iterable[ApiKey]) -> str:
    lines = ["# threadline API keys: written by `threadline keys`; hashes only, never keys.", ""]
    for key in keys:
        lines.append("[[keys]]")
        for field, value in _fields(key).items():
            # A JSON string or integer is a valid TOML basic string or integer.
            lines.append(f"{field} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def _fields(key: ApiKey) -> dict[str, Any]:
    return {k: v for k, v in asdict(key).items() if v is not None}
