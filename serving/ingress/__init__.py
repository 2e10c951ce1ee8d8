"""HTTP ingress: FastAPI app, its own process (`svd-serve api`)."""
