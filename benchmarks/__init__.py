"""functuner's benchmark suite: ``python -m benchmarks [--quick] [--only NAME ...]`` (see ``__main__``).

Every group asserts that the implementations it compares produce the same
outputs before timing them, runs the compared variants interleaved in one
process after warm-up, and reports medians as ratios (absolute times on a
shared machine are noise).  No test asserts a time.
"""
