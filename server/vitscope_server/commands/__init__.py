"""The batch subcommands of `vitscope-server`: each module adds its flags and runs its command."""
