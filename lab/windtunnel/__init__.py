"""Bayesian wind tunnels: tasks with exact posteriors (bijection elimination, HMM state
tracking), the models trained on them, and calibration against the Bayes oracle."""
