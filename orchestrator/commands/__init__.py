"""One module per `python -m orchestrator.run` command: `add_arguments(parser)` and `main(args)`."""
