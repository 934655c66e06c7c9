"""Once-per-server reports: what one process of a server has logged, the others need not.

``reported-<hash>`` in the server's private runtime directory (:mod:`wsgi_reload.runtime`)
says a message was logged once for the whole server.
"""

from __future__ import annotations

import hashlib
import os

REPORTED_PREFIX = "reported-"


def first_report(directory: str, key: str) -> bool:
    """True for the first process of the server to report ``key`` (an error, say)."""
    name = REPORTED_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        os.close(os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True
