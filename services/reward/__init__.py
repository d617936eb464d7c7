"""The reward service: scores responses with a learned reward model or a rule-based scorer."""
