"""Assembly of the parties from configuration: load the model, split it, build the app, run it on a channel."""
