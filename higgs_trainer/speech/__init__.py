"""Listening to a run: speech samples, their scores, and one page to compare checkpoints.

The modules here are imported only when used; their dependencies are the ``speech`` extra
(``pip install "higgs-trainer[speech]"``).
"""
