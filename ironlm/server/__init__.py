"""OpenAI-compatible HTTP server over the async engine. The engine never imports this package."""
