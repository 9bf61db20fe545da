"""`seekwen serve`: an OpenAI-compatible HTTP server on top of the batching engine.

- `app.py`: the FastAPI application (endpoints, request handling, streaming);
- `schemas.py`: request bodies (pydantic) and their validation;
- `loop.py`: the engine thread (continuous batching) and its bridge to the asyncio event loop;
- `reasoning.py`: `<think>...</think>` split into `reasoning_content` and `content`;
- `metrics.py`: Prometheus text for /metrics;
- `errors.py`: OpenAI-shaped errors, size-limit and API-key middleware.
"""
