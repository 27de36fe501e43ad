"""asgiproxy (PyPI; Starlette + aiohttp) in front of ``BENCH_UPSTREAM_URL``: the Python peer of the proxy group.

Built the way its own command line builds it (``python -m asgiproxy URL``: ``make_app``, which
rewrites ``Host`` to the upstream's and lets 20 requests through to the upstream at a time), and
served by the harness under uvicorn like every other app. It does no idempotency.
"""

from __future__ import annotations

import os

from asgiproxy.__main__ import make_app

from benchmarks.apps.common import UPSTREAM_URL_ENV

app, context = make_app(upstream_base_url=os.environ.get(UPSTREAM_URL_ENV, "http://127.0.0.1:8080"))
