"""The worker processes: one file per role (``inference``, ``predictor``, ``loader``)."""
