"""Wire protocols, sans-IO (no sockets, no trio): bytes in, events out.

- `framing`: frames, HELLO and version negotiation; what every end needs.
- `rootstream`: helper -> daemon, versioned root stream: its records and the
  helper's side (the helper reads only the daemon's HELLO).
- `receive`: the receiving ends (frame splitting, payload decoding, the
  daemon's fail-closed RootStreamReceiver): never imported by the helper.
- `admin`: gcroots-query <-> gcrootsd requests and streamed answers.
- `nixcompat`: Nix >= 2.34 `nix store roots-daemon` format.
"""
