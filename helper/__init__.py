"""gcroots-helper: the only privileged code.  Reads roots, never writes.

Imports neither trio nor the daemon or client packages (a test guards it).
"""
