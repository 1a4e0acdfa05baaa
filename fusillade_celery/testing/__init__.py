"""Test doubles shared by the demo, the tests and the benchmarks (the mock tool server; the
mock upstream is ``mock_upstream.py``)."""
