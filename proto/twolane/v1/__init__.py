"""Generated protobuf and gRPC code for the twolane.v1 API (run `make proto`)."""
