"""Generated protobuf and gRPC code for proto/peftserve/v1 (`make proto`); never edited."""
