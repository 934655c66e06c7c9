"""A Starlette app whose answer comes from greeting.py, the file the tests edit."""

import greeting
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

greeting.setup()


async def home(request):
    return PlainTextResponse(greeting.text())


app = Starlette(routes=[Route("/", home)])
