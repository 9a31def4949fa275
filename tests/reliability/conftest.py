"""The reliability tests' helpers report failures with pytest's detailed assertions."""

import pytest

pytest.register_assert_rewrite("tests.reliability._helpers")
