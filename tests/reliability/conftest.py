"""The reliability tests' helpers get pytest's detailed assertions: see tests/conftest.py."""
