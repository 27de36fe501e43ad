"""ASGI apps the harness serves under uvicorn, one module per variant.

Each module exposes ``app`` and reads its configuration from environment variables
(see :mod:`benchmarks.apps.common`), so uvicorn can load it by import string.
"""
