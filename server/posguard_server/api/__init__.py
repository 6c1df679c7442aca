"""The gRPC face of posguard: servicers, the request pipeline, error mapping and the role matrix."""
