"""Subcommands of `mla-graph`, one module each (register + run)."""
