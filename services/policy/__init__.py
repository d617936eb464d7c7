"""The policy service: batched sampling from the current policy version."""
