# A tiny package for the demo and the container test, built by the real Nix
# with /bin/sh: each output records its dependencies' store paths in a file,
# so Nix's reference scanner registers real references between them, and a
# zero-filled payload gives it a size worth collecting.
name: deps: derivation {
  inherit name;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ''
    /bin/mkdir $out
    echo "${name}" > $out/README
    for d in ${toString deps}; do echo "$d" >> $out/deps; done
    /usr/bin/head -c ${toString (4096 * (1 + builtins.stringLength name))} /dev/zero > $out/payload
  '' ];
}
