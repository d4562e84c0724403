"""The model packages that ship with osteoscan, installed as ``osteoscan._models``.

Each sub-folder is a model package (``manifest.json`` + weights); this file only makes the folder
a Python package so that wheels carry it and ``importlib.resources`` finds it (see setup.py).
"""
