"""The HTTP edge of one replica: the OpenAI-compatible FastAPI app, its schemas, errors, metrics and the
generation endpoints.
"""
