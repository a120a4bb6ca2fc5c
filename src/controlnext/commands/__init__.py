"""One module per `controlnext` subcommand; each exposes `register(subparsers)`."""
