"""A small WSGI app whose answer comes from greeting.py, the file the tests edit."""

import greeting


def make_app():
    greeting.setup()

    def app(environ, start_response):
        body = greeting.text().encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    return app


app = make_app()
application = app
