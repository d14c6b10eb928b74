"""Bearer-token auth with scopes.

Tokens come from a file (`auth.tokens_file`) or a systemd credential (`auth.credential`,
read from `$CREDENTIALS_DIRECTORY`), one per line: `NAME SCOPES TOKEN`, scopes a comma list
of `submit`, `read`, `admin` (admin implies the others). Only SHA-256 digests are kept in
memory; a presented token is compared with every one in constant time. With no tokens
configured, every request is anonymous and allowed; `auth.open` paths never need one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from daemon.errors import Forbidden, Unauthorized

logger = logging.getLogger(__name__)
# Other users reading the tokens, or anyone but the owner writing some of their own.
LAX_MODE = stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP

if TYPE_CHECKING:
    from daemon.config import AuthConfig

SCOPES = frozenset({"submit", "read", "admin"})
ANONYMOUS = "anonymous"
CALLER = web.RequestKey("caller", str)  # the token's name, or ANONYMOUS


class TokenFileError(Exception):
    """A token source cannot be used; `key` is the setting that names it."""

    def __init__(self, message: str, key: str = "auth.tokens_file") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    scopes: frozenset[str]
    digest: bytes


def parse_tokens(text: str) -> list[Token]:
    tokens, names = [], set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise TokenFileError(f"line {number}: expected NAME SCOPES TOKEN")
        name, scope_list, secret = parts
        scopes = frozenset(s for s in scope_list.split(",") if s)
        if not scopes or not scopes <= SCOPES:
            raise TokenFileError(
                f"line {number}: scopes must be a comma list of {', '.join(sorted(SCOPES))}"
            )
        if len(secret) < 16:
            raise TokenFileError(f"line {number}: token {name!r} is shorter than 16 characters")
        if name in names:
            raise TokenFileError(f"line {number}: token name {name!r} is used twice")
        names.add(name)
        tokens.append(Token(name, scopes, hashlib.sha256(secret.encode()).digest()))
    return tokens


def load_tokens(config: AuthConfig) -> list[Token]:
    """Read the configured token sources. Raises `TokenFileError` naming what is wrong."""
    tokens: list[Token] = []
    sources: list[tuple[str, Path]] = []
    if config.tokens_file:
        sources.append(("auth.tokens_file", Path(config.tokens_file)))
    if config.credential:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise TokenFileError(
                "set but $CREDENTIALS_DIRECTORY is not (use LoadCredential=)", "auth.credential"
            )
        sources.append(("auth.credential", Path(directory) / config.credential))
    for key, source in sources:
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenFileError(f"cannot read {source}: {exc.strerror}", key) from exc
        except UnicodeDecodeError:
            raise TokenFileError(f"{source}: not UTF-8 text", key) from None
        try:
            found = parse_tokens(text)
        except TokenFileError as exc:
            raise TokenFileError(f"{source}: {exc}", key) from None
        if not found:
            # An empty file would turn authentication off without a word.
            raise TokenFileError(f"{source}: holds no token", key)
        _warn_if_lax(key, source)
        tokens += found
    return tokens


def _warn_if_lax(key: str, source: Path) -> None:
    try:
        mode = source.stat().st_mode
    except OSError:
        return  # it was just read; a race with its removal is not worth a second error
    if mode & LAX_MODE:
        logger.warning(
            "%s %s has mode %s: other users may read or add tokens; chmod 600 (or 640 with "
            "the daemon's group) is enough",
            key,
            source,
            oct(stat.S_IMODE(mode)),
            extra={"event": "auth.tokens_file_lax"},
        )


def required_scope(method: str, path: str) -> str:
    """submit: POST /v1/tasks; admin: cancel, retry, pause and resume; read: the rest."""
    if method == "POST" and (path.endswith("/pause") or path.endswith("/resume")):
        return "admin"
    if path.startswith("/v1/tasks"):
        if method == "POST" and path.rstrip("/") in ("/v1/tasks", "/v1/tasks/batch"):
            return "submit"
        if method == "DELETE" or (method == "POST" and path.endswith("/retry")):
            return "admin"
    return "read"


class Authenticator:
    def __init__(self, tokens: list[Token], open_paths: list[str]) -> None:
        self.tokens = tokens
        self.open_paths: frozenset[str] = frozenset(open_paths)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def identify(self, header: str | None) -> Token:
        scheme, _, credentials = (header or "").partition(" ")
        if scheme.lower() != "bearer":  # schemes are case-insensitive (RFC 9110 11.1)
            raise Unauthorized("send Authorization: Bearer <token>", field="Authorization")
        digest = hashlib.sha256(credentials.strip().encode()).digest()
        found = None
        for token in self.tokens:  # no early exit: the time does not depend on the match
            if hmac.compare_digest(token.digest, digest):
                found = token
        if found is None:
            raise Unauthorized("the token is not valid", field="Authorization")
        return found

    def authorize(self, request: web.Request) -> str:
        """The name of the caller, or raise `Unauthorized` / `Forbidden`."""
        if not self.enabled or request.path in self.open_paths:
            return ANONYMOUS
        token = self.identify(request.headers.get("Authorization"))
        scope = required_scope(request.method, request.path)
        if scope not in token.scopes and "admin" not in token.scopes:
            raise Forbidden(f"token {token.name!r} lacks the {scope!r} scope", field="scope")
        return token.name
