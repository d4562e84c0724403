"""Helpers for tests, demos and benchmarks: synthetic radiographs and DICOM/PNG writers.

Nothing that scans, trains or evaluates imports this package; it ships with osteoscan so that
``osteoscan bench`` and ``examples/make_demo.py`` work from an installed wheel.
"""
