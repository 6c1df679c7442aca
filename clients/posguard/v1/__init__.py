"""Generated code; regenerate with scripts/gen_protos.py."""
