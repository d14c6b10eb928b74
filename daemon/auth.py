"""Bearer-token auth with scopes.

Tokens come from a file (`auth.tokens_file`) or a systemd credential (`auth.credential`,
read from `$CREDENTIALS_DIRECTORY`), one per line: `NAME SCOPES TOKEN`, scopes a comma list
of `submit`, `read`, `admin` (admin implies the others). Only SHA-256 digests are kept in
memory; a presented token is compared with every one in constant time. With no tokens
configured, every request is anonymous and allowed; `auth.open` paths never need one.

Browsers are kept out whether or not tokens are configured: a request whose `Origin` is not
this server's own, or marked `Sec-Fetch-Site: cross-site`, is refused (403), so no web page
can drive the API (CSRF); and with no tokens, a `Host` that is neither `localhost` nor an IP
address is refused too, since a page on a domain rebound to 127.0.0.1 would send its own
name (DNS rebinding). Requests over a unix socket need no Host: no browser reaches one.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import hdrs, web
from multidict import istr
from yarl import URL

from daemon.errors import Forbidden, Unauthorized

_SEC_FETCH_SITE = istr("Sec-Fetch-Site")
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


def load_tokens(config: AuthConfig, *, warn_lax: bool = True) -> list[Token]:
    """Read the configured token sources. Raises `TokenFileError` naming what is wrong.
    With `warn_lax`, a source other users may read, or others than its owner may write,
    is logged (`auth.tokens_file_lax`): the daemon's start and each reload say it once; the
    config check that precedes them reads the files with `warn_lax=False`."""
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
        if warn_lax:
            _warn_if_lax(key, source)
        tokens += found
    return tokens


def _warn_if_lax(key: str, source: Path) -> None:
    said = lax_note(key, source)
    if said is not None:
        logger.warning("%s", said, extra={"event": "auth.tokens_file_lax"})


def lax_note(key: str, source: Path) -> str | None:
    """What is wrong with the mode of the tokens file `source` (`key` names it), or None."""
    try:
        mode = source.stat().st_mode
    except OSError:
        return None  # it was just read; a race with its removal is not worth a second error
    if not mode & LAX_MODE:
        return None
    return (
        f"{key} {source} has mode {oct(stat.S_IMODE(mode))}: {lax_access(mode)}; "
        "chmod 600 (or 640 with the daemon's group) is enough"
    )


_WRITERS = ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "other users"))


def lax_access(mode: int) -> str:
    """What `mode` lets others than the owner do with a tokens file, in words."""
    said = []
    if mode & stat.S_IROTH:
        said.append("other users can read its tokens")
    writers = [who for bit, who in _WRITERS if mode & bit]
    if writers:
        said.append(f"{' and '.join(writers)} can change it (add a token of their own)")
    return ", and ".join(said)


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
        refuse_browsers(request, check_host=not self.enabled)
        if not self.enabled or request.path in self.open_paths:
            return ANONYMOUS
        token = self.identify(request.headers.get("Authorization"))
        scope = required_scope(request.method, request.path)
        if scope not in token.scopes and "admin" not in token.scopes:
            raise Forbidden(f"token {token.name!r} lacks the {scope!r} scope", field="scope")
        return token.name


def refuse_browsers(request: web.Request, *, check_host: bool) -> None:
    """Raise `Forbidden`, naming the header, for a request a web page made (an `Origin`
    other than this server's, or `Sec-Fetch-Site: cross-site`) and, with `check_host`, for a
    `Host` that is a DNS name other than localhost on a TCP connection. Clients that are not
    browsers send neither header, and name the host they connect to."""
    # istr keys: multidict looks them up without folding their case (on every request).
    headers = request.headers
    origin = headers.get(hdrs.ORIGIN)
    if origin is not None and not _same_origin(origin, headers.get(hdrs.HOST)):
        raise Forbidden(
            "a request from a web page of another origin is refused; "
            "call the API from a program, which sends no Origin",
            field="Origin",
        )
    if headers.get(_SEC_FETCH_SITE) == "cross-site":
        raise Forbidden("a cross-site request from a web page is refused", field="Sec-Fetch-Site")
    if not check_host:
        return
    host = headers.get(hdrs.HOST)
    if host is not None and not _local_name(host) and not _over_unix(request):
        raise Forbidden(
            "with no tokens configured, Host must be localhost or an IP address "
            "(a DNS name may have been rebound to this machine by a web page)",
            field="Host",
        )


def _same_origin(origin: str, host: str | None) -> bool:
    """`Origin` names the scheme (http, or https behind a proxy), host and port of `Host`."""
    if host is None:
        return False
    try:
        sent = URL(origin)
        own = URL.build(scheme=sent.scheme, authority=host)
    except (ValueError, TypeError):
        return False
    if sent.scheme not in ("http", "https") or sent.raw_path not in ("", "/") or not sent.host:
        return False  # "null" (a sandboxed page, a file), or not an origin at all
    return (sent.host.lower(), sent.port) == ((own.host or "").lower(), own.port)


@functools.lru_cache(maxsize=64)
def _local_name(host: str) -> bool:
    """`Host` (with or without a port) is localhost or an IP address: no DNS name."""
    if host.startswith("["):
        name = host[1:].partition("]")[0]
    else:
        name = host.rpartition(":")[0] if ":" in host else host
    if name.lower().rstrip(".") == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _over_unix(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not isinstance(transport.get_extra_info("sockname"), tuple)
