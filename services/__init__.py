"""The serving processes: policy, reference, reward, trainer (gRPC) and the HTTP gateway.

Each role lives in its own subpackage with a transport-neutral core and a thin gRPC servicer;
``services.common`` holds the shared server bootstrap, error mapping, metrics and client
helpers; ``services.supervisor`` starts them all (``palm-rlhf up``).
"""
