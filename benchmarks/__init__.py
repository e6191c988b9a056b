"""pytest-benchmark suites (`pytest benchmarks/ --benchmark-only`) and `python -m benchmarks.report`."""
