"""Wire protocols, sans-IO (no sockets, no trio): bytes in, events out.

- `rootstream`: helper -> daemon, versioned, fail-closed root stream.
- `admin`: gcroots-query <-> gcrootsd requests and streamed answers.
- `nixcompat`: Nix >= 2.34 `nix store roots-daemon` format.
"""
