"""The reference service: log-probabilities under the frozen starting policy (the KL anchor)."""
