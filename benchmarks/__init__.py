"""rfmpc's speed, memory and quality benchmarks, one module a benchmark (``docs/benchmarks.md``).

Run one as a module from the repository root (or with the root on ``PYTHONPATH``)::

    python -m benchmarks.mmdit_speed --case small --runs 2

``python benchmarks/<name>.py`` still works: the script re-executes itself as
``python -m benchmarks.<name>`` with the repository root prepended to ``PYTHONPATH``
(:mod:`benchmarks._as_module`). The helpers every benchmark shares (timing, peak memory, XLA
memory analysis, load average, markdown tables, the tests' fixtures) are in
:mod:`benchmarks._common`; the image metrics are the library's, :mod:`rfmpc.metrics`. Importing
a benchmark module does no work: each measures only from its ``main``.
"""
