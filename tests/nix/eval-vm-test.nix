# nix/tests/multi-user.nix with stand-ins: its name, testScript and /etc
# files as text, and its node's services.gcroots run through the module
# (tests/nix/eval-module.nix), so that the tests can check the node's
# configuration against the module's options and assertions.
let
  lib = import ./stub-lib.nix;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  test = import ../../nix/tests/multi-user.nix { inherit lib; };
  node = test.nodes.machine {
    inherit lib pkgs;
    config = { };
  };
in
{
  inherit (test) name testScript;
  imports = map toString node.imports;
  etc = builtins.mapAttrs (_: file: file.text) node.environment.etc;
  module = import ./eval-module.nix {
    gcroots = node.services.gcroots;
    system = {
      inherit (node) boot nix;
    };
  };
}
