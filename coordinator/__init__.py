"""The coordinator process and what it owns: the cache directory, the load queue policy, the request queue."""
