"""Offline work on a checkpoint: routing traces and the learned expert predictor (``--train-predictor``)."""
