"""gcrootsd: the unprivileged Trio daemon (roots + graph -> live/dead, GC)."""
