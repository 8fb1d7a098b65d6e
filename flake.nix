{
  description = "gcroots: a privilege-separated garbage-collector root scanner for the Nix store";

  # nixos-unstable: the module reads boot.nixStoreMountOpts and nix.daemonUser,
  # which older releases lack.  No flake.lock is committed yet: it was
  # written on a machine without network access to pin one.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      # Landlock, seccomp and /proc: Linux only.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: prev: {
        gcroots = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        gcroots = pkgs.callPackage ./nix/package.nix { };
        gcroots-helper = gcroots.helper;
        default = gcroots;
      });

      # The module builds its default package from ./nix/package.nix with the
      # system's own pkgs, so it needs neither this flake's nixpkgs nor the
      # overlay.
      nixosModules = {
        gcroots = ./nix/module.nix;
        default = self.nixosModules.gcroots;
      };

      checks = forAllSystems (pkgs: {
        inherit (self.packages.${pkgs.stdenv.hostPlatform.system}) gcroots gcroots-helper;
        multi-user = pkgs.testers.runNixOSTest ./nix/tests/multi-user.nix;
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
