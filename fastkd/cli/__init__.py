"""Modules of `fastkd` subcommands that belong to no other package (see `fastkd.__main__`)."""
