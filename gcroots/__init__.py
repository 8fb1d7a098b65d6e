"""gcroots: a privilege-separated garbage collector root scanner for Nix.

Sub-packages (each in its own top-level folder of the repository):
`gcroots.protocol`, `gcroots.helper`, `gcroots.daemon`, `gcroots.client`.
This package itself holds the small shared, standard-library-only modules
(store path syntax, store layout) that the privileged helper may import.
"""
