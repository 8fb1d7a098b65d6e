# Stand-ins for the packages nix/*.nix use, for tests/test_nix_files.py: a
# "package" is an attribute set with a made-up store path, and
# buildPythonApplication returns its arguments (as `drvAttrs`) so that the
# tests can check them against pyproject.toml.
{ lib }:
let
  fakeStorePath = name: "/nix/store/00000000000000000000000000000000-${name}";
  fakePackage = name: {
    type = "derivation";
    pname = name;
    inherit name;
    outPath = fakeStorePath name;
  };

  python3Packages =
    lib.genAttrs [
      "argparse-manpage"
      "cffi"
      "numpy"
      "prometheus-client"
      "pyroute2"
      "setuptools"
      "shtab"
      "structlog"
      "tqdm"
      "trio"
      "wheel"
    ] fakePackage
    // {
      python = {
        sitePackages = "lib/python3.11/site-packages";
        interpreter = "${fakeStorePath "python3"}/bin/python3.11";
      };
      buildPythonApplication =
        attrs:
        (attrs.passthru or { })
        // {
          type = "derivation";
          inherit (attrs) pname version;
          name = "${attrs.pname}-${attrs.version}";
          outPath = fakeStorePath "${attrs.pname}-${attrs.version}";
          inherit (attrs) meta;
          drvAttrs = attrs;
        };
    };

  pkgs = {
    inherit lib python3Packages;
    # nixpkgs' callPackage: the function's named arguments from pkgs, then
    # the explicit ones.
    callPackage =
      fn: args:
      let
        f = if builtins.isFunction fn then fn else import fn;
      in
      f (builtins.intersectAttrs (builtins.functionArgs f) pkgs // args);
    stdenv.hostPlatform.system = "x86_64-linux";
    # The test module itself, to be looked at.
    testers.runNixOSTest = test: {
      _type = "nixos-test";
      inherit test;
    };
  }
  // lib.genAttrs [
    "busybox"
    "installShellFiles"
    "iproute2"
    "libseccomp"
    "nixfmt-rfc-style"
    "python3"
    "socat"
  ] fakePackage;
in
pkgs
