"""The SQL store: schema, queries, and the flusher that moves the WAL into it."""
