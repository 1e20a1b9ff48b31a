"""Evaluation: log-likelihoods (the lm-evaluation-harness contract), per-token and positional
losses, and the harness adapter."""
