"""Trained models out of a run directory (docs/inference.md): :func:`rayexperts.inference.load.load` (also
``rayexperts.load``), ``rayexperts eval`` (:mod:`.evaluate`), ``predict`` on Ray Data (:mod:`.predict`), ``export``
(:mod:`.export`) and ``serve`` on Ray Serve (:mod:`.serve`). Its modules are imported where they are used: only the
CLI and ``rayexperts.load`` import this layer, and it imports torch and Ray."""
