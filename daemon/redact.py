"""URLs as logs, errors and API answers may show them: without a password or a query.

Operators write credentials into URLs (`postgresql://app:secret@db/offload`, a webhook's
`https://user:pass@host/hook?token=...`), and URLs end up in log lines, config errors and a
task's `last_error`, which every client with the read scope sees. This never raises, whatever
the text: a URL too broken to parse is still shown without what could be a secret.
"""

from __future__ import annotations

import re

# "scheme:" and, when present, "//": what comes before the user information.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:(?://)?")


def url(text: str) -> str:
    """`text` without the password of its user information, its query and its fragment:
    `postgresql://app:secret@db/x?sslpassword=y` becomes `postgresql://app:***@db/x`."""
    text = text.split("?", 1)[0].split("#", 1)[0]
    scheme = _SCHEME.match(text)
    start = scheme.end() if scheme else 0
    at = text.rfind("@", start)  # a raw "@" in a password must not show what follows it
    if at < 0:
        return text
    user, colon, _ = text[start:at].partition(":")
    return f"{text[:start]}{user}{':***' if colon else ''}{text[at:]}"
