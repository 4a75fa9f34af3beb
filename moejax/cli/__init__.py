"""The `moejax` command: its dispatch table, shared flag groups, one module per subcommand."""
