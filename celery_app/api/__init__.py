"""What outsiders use: the HTTP API, the dispatcher, tokens and metrics."""
