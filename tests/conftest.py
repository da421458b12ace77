"""Options for the whole test suite (fixtures live next to the tests that use them)."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen-golden",
        action="store_true",
        default=False,
        help="rewrite tests/unit/golden/*.xml from the current templates instead of comparing",
    )
