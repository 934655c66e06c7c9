"""An app with in-memory state: a restart resets the count, a patch keeps it."""

import counting

HITS = [0]


def app(environ, start_response):
    HITS[0] += 1
    body = counting.text(HITS[0]).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
