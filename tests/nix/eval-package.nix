# nix/package.nix evaluated with stand-ins (tests/nix/stub-*.nix): the
# arguments it gives buildPythonApplication, for both builds, as JSON-able
# data (paths as strings, packages as their names).
let
  lib = import ./stub-lib.nix;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  root = toString ../..;

  relative = path: lib.removePrefix "${root}/" (toString path);
  describe =
    pkg:
    let
      a = pkg.drvAttrs;
    in
    {
      inherit (a) pname version doCheck pyproject;
      mainProgram = a.meta.mainProgram;
      build-system = map (p: p.pname) a.build-system;
      dependencies = map (p: p.pname) a.dependencies;
      nativeBuildInputs = map (p: p.pname) (a.nativeBuildInputs or [ ]);
      optional-dependencies = builtins.mapAttrs (_: map (p: p.pname)) (a.optional-dependencies or { });
      pythonRemoveDeps = a.pythonRemoveDeps or [ ];
      postInstall = a.postInstall or "";
      pythonImportsCheck = a.pythonImportsCheck or [ ];
      srcRoot = relative a.src.root;
      srcFiles = map relative a.src.fileset;
    };

  full = pkgs.callPackage ../../nix/package.nix { };
  noMetrics = pkgs.callPackage ../../nix/package.nix { withMetrics = false; };
in
{
  gcroots = describe full;
  helper = describe full.helper;
  withoutMetrics = describe noMetrics;
}
