# flake.nix's outputs, evaluated against a stand-in nixpkgs input (stub lib
# and packages): which outputs exist for which systems, and what they are.
let
  lib = import ./stub-lib.nix;
  pkgsFor =
    system:
    let
      pkgs = import ./stub-pkgs.nix { inherit lib; };
    in
    pkgs // { stdenv.hostPlatform.system = system; };
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs [
      "x86_64-linux"
      "aarch64-linux"
      "x86_64-darwin"
    ] pkgsFor;
  };
  flake = import ../../flake.nix;
  self = flake.outputs { inherit self nixpkgs; } // {
    outPath = toString ../..;
  };
  names = attrs: builtins.attrNames attrs;
in
{
  inherit (flake) description;
  inputs = builtins.mapAttrs (_: input: input.url) flake.inputs;
  outputs = names self;
  packages = builtins.mapAttrs (_: ps: builtins.mapAttrs (_: p: p.name) ps) self.packages;
  checks = builtins.mapAttrs (
    _: cs: builtins.mapAttrs (_: c: if c ? test then "test:${toString c.test}" else c.name) cs
  ) self.checks;
  nixosModules = builtins.mapAttrs (_: toString) self.nixosModules;
  overlay = (self.overlays.default (pkgsFor "x86_64-linux") { }).gcroots.name;
  formatter = builtins.mapAttrs (_: f: f.name) self.formatter;
}
