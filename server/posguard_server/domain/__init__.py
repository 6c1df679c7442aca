"""Domain objects and rules of posguard: plain Python, no gRPC and no SQLAlchemy."""
