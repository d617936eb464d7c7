"""palm_rlhf.v1 contract modules (generated; do not edit the *_pb2* files by hand)."""
