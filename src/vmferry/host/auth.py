"""The control API's bearer token: one secret shared by the hosts of a cluster.

A host reads its token from ``--token-file`` (created with mode 0600 holding a fresh random
token when it does not exist) and requires ``Authorization: Bearer <token>`` on every
control request.  The hosts of one cluster share the file, so a source presents the same
token when it calls its destination.  The CLI takes the token from ``VMFERRY_TOKEN`` or
from ``--token-file``.

A token file must be a regular file that only its owner can read or write: a token others
can read is no secret, so a file with group or other permission bits is refused.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from vmferry.errors import ConfigError

TOKEN_ENV = "VMFERRY_TOKEN"
TOKEN_FILE_ENV = "VMFERRY_TOKEN_FILE"
#: bytes of randomness in a generated token (URL-safe base64 text of 43 characters)
TOKEN_BYTES = 32
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096


def load_or_create_token(path: Path) -> str:
    """The token in ``path``; a new random one written there (mode 0600) if the file does
    not exist.  ConfigError if it cannot be read or created, is not a regular file, can be
    read by others, or holds no usable token."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return read_token_file(path)
    except OSError as exc:
        raise ConfigError(f"cannot create token file {path}: {exc.strerror}") from exc
    token = secrets.token_urlsafe(TOKEN_BYTES)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        raise ConfigError(f"cannot write token file {path}: {exc.strerror}") from exc
    return token


def read_token_file(path: Path) -> str:
    """The token in an existing file (checks as :func:`load_or_create_token`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"cannot open token file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"token file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"token file {path} can be read by others (mode {st.st_mode & 0o777:o}); "
                "chmod 600 it"
            )
        raw = f.read(MAX_TOKEN_CHARS + 2)
    return check_token(raw, f"token file {path}")


def check_token(raw: bytes | str, what: str) -> str:
    """A token's text without surrounding white space; ConfigError naming ``what`` if it
    is too short, too long or not printable ASCII (nothing of it is echoed)."""
    try:
        text = (raw.decode("ascii") if isinstance(raw, bytes) else raw).strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{what} does not hold an ASCII token") from None
    if not MIN_TOKEN_CHARS <= len(text) <= MAX_TOKEN_CHARS or not all(
        33 <= ord(c) < 127 for c in text
    ):
        raise ConfigError(
            f"{what} must hold one token of {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} "
            "printable characters"
        )
    return text


def client_token(token_file: Path | None) -> str | None:
    """The token a CLI command presents: ``VMFERRY_TOKEN``, else the token file
    (``--token-file`` or ``VMFERRY_TOKEN_FILE``); None if neither is given."""
    env = os.environ.get(TOKEN_ENV)
    if env:
        return check_token(env, TOKEN_ENV)
    if token_file is None and os.environ.get(TOKEN_FILE_ENV):
        token_file = Path(os.environ[TOKEN_FILE_ENV])
    return read_token_file(token_file) if token_file is not None else None


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant-time compare)."""
    if header is None:
        return False
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable only from this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
