"""A FastAPI app whose answer comes from greeting.py, the file the tests edit."""

import greeting
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

greeting.setup()

app = FastAPI()


@app.get("/", response_class=PlainTextResponse)
async def home() -> str:
    return greeting.text()
