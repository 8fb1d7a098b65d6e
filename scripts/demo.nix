# A small world for the demo, built by the real Nix: packages with runtime
# references between them (each output records its dependencies' paths).
let
  pkg = import ./demo-package.nix;
  libc = pkg "libc-2.38" [];
  zlib = pkg "zlib-1.3" [ libc ];
  openssl = pkg "openssl-3.0.12" [ libc zlib ];
  curl = pkg "curl-8.4.0" [ libc zlib openssl ];
  python = pkg "python3-3.11.6" [ libc zlib openssl ];
  requests = pkg "python3-requests-2.31" [ python ];
  app = pkg "alice-webapp-1.0" [ python requests curl ];
  # Things nobody needs any more once their roots are gone:
  oldCurl = pkg "curl-7.88.1" [ libc zlib openssl ];
  oldApp = pkg "alice-webapp-0.9" [ python oldCurl ];
  scratch = pkg "bob-experiment" [ libc ];
  editor = pkg "vim-9.0" [ libc ];
in { inherit libc zlib openssl curl python requests app oldCurl oldApp scratch editor; }
