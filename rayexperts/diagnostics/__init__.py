"""What the GPU tests (``tests/gpu``, run by ``jobs/gpu_check.py``) share with the CPU tests of the GPU path
(``tests/test_gpu_path.py``): the dispatch census of one step (:mod:`~rayexperts.diagnostics.census`) and short
in-process runs without Ray (:mod:`~rayexperts.diagnostics.runs`). docs/gpu.md explains the findings they check."""
