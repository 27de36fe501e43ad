"""The middleware's keyword options are exactly IdempotencyConfig's fields, and override ``config``."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from relay_idem import IdempotencyConfig, IdempotencyMiddleware


async def app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("not called")


def test_every_config_field_is_a_keyword_option_of_the_middleware_and_nothing_else() -> None:
    parameters = inspect.signature(IdempotencyMiddleware.__init__).parameters
    keyword_only = {name for name, parameter in parameters.items() if parameter.kind is parameter.KEYWORD_ONLY}
    assert keyword_only == {field.name for field in dataclasses.fields(IdempotencyConfig)}


def test_keyword_options_override_config_and_unset_ones_keep_it() -> None:
    config = IdempotencyConfig(ttl=5, on_conflict="wait")
    middleware = IdempotencyMiddleware(app, config=config, ttl=7)
    assert middleware.config.ttl == 7
    assert middleware.config.on_conflict == "wait"


def test_an_invalid_option_is_refused_when_the_middleware_is_built() -> None:
    with pytest.raises(ValueError, match="on_conflict"):
        IdempotencyMiddleware(app, on_conflict="queue")  # type: ignore[arg-type]
