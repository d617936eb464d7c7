"""The trainer service: runs update rounds, publishes and rolls back policy versions, and
announces them to policy replicas."""
