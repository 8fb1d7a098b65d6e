# The store of the container test (tests/container/scenario.py), built by the
# real Nix inside the container.  Each output records its dependencies'
# paths, so Nix registers real references between them.
let
  pkg = import ../../scripts/demo-package.nix;
in rec {
  # Kept: alice's and bob's `result` links in their 0700 homes.
  libc = pkg "libc-2.38" [ ];
  zlib = pkg "zlib-1.3" [ libc ];
  aliceApp = pkg "alice-webapp-1.0" [ zlib libc ];
  bobTool = pkg "bob-tool-2.1" [ libc ];          # garbage in round 2 (bob removes his link)
  # Kept: bob's CI job's `result` link under /tmp (nix-build -o /tmp/...).
  ciJob = pkg "bob-ci-job-1.0" [ zlib ];
  # Kept only by a running process of bob's holding a file open.
  heldDep = pkg "held-dep-0.1" [ ];
  held = pkg "held-by-bob-3.0" [ heldDep ];
  # Garbage, round 1 (`gcroots-query gc`): a removed result link, a bare build.
  oldLib = pkg "old-lib-0.9" [ libc ];
  oldApp = pkg "alice-webapp-0.9" [ oldLib zlib ];
  scratch = pkg "scratch-build" [ ];
  # Garbage, round 2 (the timer's gcroots-gc.service), built after round 1.
  laterDep = pkg "later-dep-1.0" [ libc ];   # bob's build during that collection may use it
  later = pkg "later-garbage-1.0" [ laterDep ];
  # The rootless model's world, built through the unprivileged nix-daemon.
  rlLib = pkg "rootless-lib-1.0" [ libc ];
  rlApp = pkg "rootless-app-1.0" [ rlLib zlib ];   # alice's result link
  rlOld = pkg "rootless-old-0.9" [ rlLib ];        # garbage (bob's build may use it)
  rlScratch = pkg "rootless-scratch" [ ];          # garbage
  # What alice and bob build while a collection runs (a second each) and
  # after it: each records its dependencies, like pkg.
  slow = name: deps: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" ''
      /bin/sleep 1
      /bin/mkdir $out
      for d in ${toString deps}; do echo "$d" >> $out/deps; done
    '' ];
  };
}
