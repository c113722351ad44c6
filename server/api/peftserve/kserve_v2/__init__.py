"""Generated protobuf and gRPC code for proto/peftserve/kserve_v2 (`make proto`); never edited."""
