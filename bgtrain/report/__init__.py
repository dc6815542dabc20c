"""Seeing a run: TensorBoard event files (:mod:`bgtrain.report.tensorboard`) and an HTML report that compares
runs (``python -m bgtrain.report``, :mod:`bgtrain.report.cli`)."""
