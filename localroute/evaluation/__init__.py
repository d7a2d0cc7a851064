"""Evaluation and calibration on real data: datasets, scorers, routing metrics, runs, thresholds.

Nothing here is imported by the server at start-up except through `localroute.calibration_file`.
"""
