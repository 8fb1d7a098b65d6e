# gcroots for nixpkgs: `python3Packages.callPackage ./nix/package.nix { }` (or
# `pkgs.callPackage`; the flake's overlay does the latter).
#
# Two builds of the same source:
#   - the package itself (gcroots-helper, gcrootsd, gcroots-query), and
#   - `passthru.helper`: gcroots-helper alone, with only the helper's own
#     dependencies.  The helper is the privileged part; its Landlock rules make
#     everything on its sys.path readable to it, so it should carry neither trio
#     nor prometheus-client (DESIGN.md: the helper imports neither trio nor the
#     daemon).  The NixOS module runs the helper from this build.
#
# Untested here: the machine this was written on has no nixpkgs, so neither
# build has been run; tests/test_nix_files.py checks what can be checked
# without it (syntax, the version read from pyproject.toml, the file set).
{
  lib,
  python3Packages,
  installShellFiles,
  # The helper's seccomp filter (and syscall numbers) come from libseccomp.
  libseccomp,
  # gcrootsd writes Prometheus metrics (the NixOS module asks for a textfile by
  # default); without prometheus-client `--metrics-*` exit with a clear error.
  withMetrics ? true,
}:

let
  pyproject = lib.importTOML ../pyproject.toml;

  # Only what the wheel is built from: changing tests/, nix/, bench/ or the
  # systemd units does not rebuild the package (or restart the services).
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../README.md # pyproject.toml's `readme`
      ../gcroots
      ../protocol
      ../helper
      ../daemon
      ../client
      ../scripts/manpages # man pages and completions from the argparse definitions
    ];
  };

  metricsDeps = [ python3Packages.prometheus-client ];

  common = {
    inherit (pyproject.project) version;
    inherit src;
    pyproject = true;

    build-system = with python3Packages; [
      setuptools
      wheel
    ];

    # The helper dlopens libseccomp by this absolute path (no search path
    # in a NixOS closure); it is what its Landlock rules then let it read.
    postPatch = ''
      substituteInPlace helper/sandbox.py --replace-fail \
        'LIBSECCOMP = "libseccomp.so.2"' \
        'LIBSECCOMP = "${lib.getLib libseccomp}/lib/libseccomp.so.2"'
    '';

    # The test suite needs root, real users, a real Nix (2.8, as the oracle),
    # systemd and a kernel with Landlock; it cannot run in the build sandbox.
    # It runs in the project's CI, and the NixOS VM test
    # (nix/tests/multi-user.nix) exercises the installed package.
    doCheck = false;

    meta = {
      description = pyproject.project.description;
      homepage = "https://github.com/gcroots/gcroots";
      license = lib.licenses.mit;
      # Landlock, seccomp, SO_PEERCRED, /proc: Linux only.
      platforms = lib.platforms.linux;
    };
  };

  helper = python3Packages.buildPythonApplication (
    common
    // {
      pname = "gcroots-helper";

      # cffi's _cffi_backend only (Landlock, seccomp and prctl, declared in
      # the generated helper/_ffi.py: no C parser at run time; its own log
      # lines): README, "What runs as root".
      # pyroute2: `sandbox-check` only, never imported by serve.
      dependencies = [
        python3Packages.cffi
        python3Packages.pyroute2
      ];
      # pyproject.toml lists the daemon's and the client's dependencies;
      # the helper never imports them (tests/test_helper_small.py guards
      # that), so drop them from the metadata instead of carrying them.
      pythonRemoveDeps = [
        "trio"
        "numpy"
        "tqdm"
        "structlog"
      ];

      # Only the helper: the other commands need trio.
      postInstall = ''
        rm "$out/bin/gcrootsd" "$out/bin/gcroots-query"
      '';

      # Fails the build if the helper ever starts importing trio.
      pythonImportsCheck = [ "gcroots.helper.cli" ];

      meta = common.meta // {
        mainProgram = "gcroots-helper";
      };
    }
  );
in
python3Packages.buildPythonApplication (
  common
  // {
    pname = pyproject.project.name;

    dependencies =
      (with python3Packages; [
        trio
        cffi # the helper's foreign calls (helper/_ffi.py)
        pyroute2 # gcroots-helper sandbox-check's netlink view
        numpy # gcrootsd's compact store graph
        structlog
        tqdm # gcroots-query's progress bars
      ])
      ++ lib.optionals withMetrics metricsDeps;

    # Man pages and bash/zsh/fish completions, generated from the argparse
    # definitions (pyproject.toml's `docs` extra).
    nativeBuildInputs = [
      installShellFiles
      python3Packages.argparse-manpage
      python3Packages.shtab
    ];
    postInstall = ''
      PYTHONPATH=$out/${python3Packages.python.sitePackages}:$PYTHONPATH \
        bash scripts/manpages docs ${python3Packages.python.interpreter}
      installManPage docs/man/man1/*.1
      for cmd in gcroots-query gcrootsd gcroots-helper; do
        installShellCompletion --cmd $cmd --bash docs/completions/bash/$cmd \
          --zsh docs/completions/zsh/_$cmd --fish docs/completions/fish/$cmd.fish
      done
    '';

    optional-dependencies.metrics = metricsDeps;

    pythonImportsCheck = [
      "gcroots.helper.cli"
      "gcroots.daemon.cli"
      "gcroots.client.cli"
    ];

    passthru = {
      inherit helper;
    };

    meta = common.meta // {
      mainProgram = "gcroots-query";
    };
  }
)
