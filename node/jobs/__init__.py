"""Completion, routing and scheduling: from stored series to queued jobs."""
