"""``llmsh serve``: the model stays loaded behind an OpenAI-compatible HTTP API.

The second front end over the engine, beside the command line (:mod:`llmsh.cli`); nothing in
the engine imports it. Starlette routes the requests (:mod:`.app`), pydantic checks their bodies
(:mod:`.schemas`), one model thread serves them one at a time from a bounded queue and keeps the
last sequence's KV cache for the next request (:mod:`.worker`), and uvicorn serves the app
(:mod:`.run`).
"""

from __future__ import annotations

from .app import create_app
from .run import bind, is_loopback, serve

__all__ = ["create_app", "serve", "bind", "is_loopback"]
