"""gcroots-query: the admin command, and client-side profile management."""
