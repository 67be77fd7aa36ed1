"""The search service, ``heimdex-clip serve`` (extra: ``serve``): the seed's search API over
HTTP, an OpenAI-compatible embeddings API, a search page, Prometheus metrics.

Build the app with :func:`heimdex_clip.serve.app.create_app`; nothing here imports FastAPI
until then (``import heimdex_clip`` never does).
"""
