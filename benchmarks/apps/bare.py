"""The message API with no idempotency layer: the baseline every ratio is taken against."""

from __future__ import annotations

from benchmarks.apps.common import create_app

app = create_app()
