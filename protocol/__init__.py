"""Wire protocol: every message the processes and clients exchange, and the one codec for them."""
