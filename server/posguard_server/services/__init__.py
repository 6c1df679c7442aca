"""Use cases of the service: each owns one unit of work between the servicers (gRPC) and the stores."""
