"""Bulk jobs: OpenAI Batch files, document summarisation, and the /v1/files + /v1/batches API."""
