"""``digitlens serve``: a page on which you draw a digit and watch every loaded model read it
(probabilities, attribution maps over the 28x28 input it saw, the preprocessing steps), browse a
run's mistakes, and the JSON API the page uses. :func:`create_app` builds the Starlette app (for
tests and other ASGI servers); :func:`serve` runs it with uvicorn."""

from digitlens.serve.app import create_app, serve

__all__ = ["create_app", "serve"]
