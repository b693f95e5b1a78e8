"""CLI command groups; each has register(subparsers)."""
