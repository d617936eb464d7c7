"""Generated protobuf/gRPC code for the service contracts (protos/palm_rlhf/proto/v1/*.proto).

Import the modules directly, e.g. ``from palm_rlhf.proto.v1 import policy_pb2, policy_pb2_grpc``.
Regenerate with ``python -m palm_rlhf.proto.codegen``.
"""
