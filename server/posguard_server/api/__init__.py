"""The gRPC face of posguard: servicers, interceptors, error mapping and the role matrix."""
