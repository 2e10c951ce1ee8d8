"""The GPU side: a queue-consuming Dispatcher, the Generator and the PostProcessor (Ray Serve)."""
