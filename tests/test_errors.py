"""broker.errors: the one table of wire codes, HTTP statuses and the documented tree."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import broker.errors as errors
from broker.errors import (
    ERROR_CODES,
    ERRORS_BY_CODE,
    BadRequest,
    BrokerError,
    Forbidden,
    RateLimited,
    TokenExpired,
    TooLarge,
    Unauthorized,
    Unavailable,
    error_for_code,
)
from broker.server.metrics import Metrics


def test_the_wire_codes_are_those_of_docs_protocol() -> None:
    assert ERROR_CODES == (
        "bad_request",
        "unauthorized",
        "forbidden",
        "rate_limited",
        "unavailable",
        "internal",
    )
    assert all(ERRORS_BY_CODE[code].code == code for code in ERROR_CODES)


@pytest.mark.parametrize(
    ("cls", "code", "status"),
    [
        (BadRequest, "bad_request", 400),
        (TooLarge, "bad_request", 413),
        (Unauthorized, "unauthorized", 401),
        (TokenExpired, "unauthorized", 401),
        (Forbidden, "forbidden", 403),
        (RateLimited, "rate_limited", 429),
        (Unavailable, "unavailable", 503),
        (BrokerError, "internal", 500),
    ],
)
def test_each_class_has_its_code_and_http_status(
    cls: type[BrokerError], code: str, status: int
) -> None:
    error = cls("why", request_id=3)
    assert (error.code, error.http_status, error.message, error.request_id) == (
        code,
        status,
        "why",
        3,
    )


def test_error_for_code_builds_the_class_and_falls_back_to_internal() -> None:
    error = error_for_code("forbidden", "no", 9)
    assert type(error) is Forbidden and error.message == "no" and error.request_id == 9
    assert type(error_for_code("no_such_code", "?")) is BrokerError


def test_metrics_count_exactly_the_wire_codes() -> None:
    assert set(Metrics(dict, process=False).errors) == set(ERROR_CODES)


def test_the_docstring_tree_names_every_error_class() -> None:
    classes = [
        name
        for name, value in vars(errors).items()
        if inspect.isclass(value) and issubclass(value, BrokerError)
    ]
    doc = errors.__doc__ or ""
    assert len(classes) >= 12
    for name in classes:
        assert f" {name} " in doc, f"{name} is missing from the tree in broker/errors.py"


def test_the_javascript_client_has_the_same_codes() -> None:
    """broker.js cannot import the table: its copy must match it."""
    source = (Path(errors.__file__).parent / "static" / "broker.js").read_text()
    table = re.search(r"const ERRORS_BY_CODE = \{(.*?)\};", source, re.S)
    assert table is not None
    assert tuple(re.findall(r"^\s*(\w+):", table.group(1), re.M)) == ERROR_CODES
    closes = re.search(r"export const CloseCode = Object\.freeze\(\{(.*?)\}\);", source, re.S)
    assert closes is not None
    js = {name: int(code) for name, code in re.findall(r"(\w+): (\d+)", closes.group(1))}
    for name in ("GOING_AWAY", "UNAUTHORIZED", "TOKEN_EXPIRED", "SLOW_CONSUMER"):
        assert js[name] == getattr(errors, "CLOSE_" + name), name
