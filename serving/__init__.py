"""Serving a model bundle to shoppers: batch recommendations over a file (``batch.py``) and the HTTP service
(``http.py``, FastAPI + uvicorn)."""
