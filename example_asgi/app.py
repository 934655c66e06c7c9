"""A small ASGI app (no framework needed) served by gunicorn's uvicorn worker, with reloads.

From the repository root:

    .venv/bin/pip install -e '.[gunicorn,asgi]'
    .venv/bin/gunicorn -c python:wsgi_reload.gunicorn -k uvicorn_worker.UvicornWorker --chdir example_asgi app:app

Then edit GREETING in greeting.py and reload http://127.0.0.1:8000. A FastAPI or Starlette
app is started the same way (``app:app`` names its application object).
"""

import greeting


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = f"{greeting.GREETING} from ASGI\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
