"""Benchmarks behind `osd bench`: side by side in one run, results as JSON plus a markdown table."""
