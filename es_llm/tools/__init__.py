"""Measuring tools: ``es-llm compare``, the benchmarks and the GPU check.

Nothing in the library imports from here; these modules sit on top of the drivers.
"""
