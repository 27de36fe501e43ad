"""A nemesis run with a checker (issue 12): real processes, faults in combination, a judged history.

``python -m benchmarks.nemesis --minutes N [--seed S]``; see ``__main__.py``.
"""
