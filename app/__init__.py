"""The HTTP floor: FastAPI app, routes, problem+json errors, the dynamically batched generator."""
