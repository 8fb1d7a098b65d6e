# NixOS module: services.gcroots.
#
# The units mirror systemd/ (the Debian units): the same sockets, users,
# hardening and Type=notify/watchdog, with the configuration in options
# instead of /etc/default/gcroots.  Differences, each explained where it is
# made: no EnvironmentFile; the helper's socket for Nix's roots daemon only
# when nixRootsDaemonCompat.enable; the scheduled `clean`'s policy from
# gc.* options (write access to the profiles only when it prunes, to homes
# and /tmp only when it ages out result links); gcrootsd's network opened to
# loopback only when it serves metrics over HTTP.
#
# Untested here: the machine this was written on has no nixpkgs.
# tests/test_nix_files.py evaluates this file with a stand-in for nixpkgs'
# lib (tests/nix/), renders the units and runs `systemd-analyze verify` and
# `systemd-analyze security` on them, compares their hardening with systemd/,
# and checks every flag on the ExecStart lines against the commands' --help.
# nix/tests/multi-user.nix is the real test, on a NixOS VM.
{
  config,
  lib,
  options,
  pkgs,
  utils,
  ...
}:

let
  cfg = config.services.gcroots;
  inherit (lib) mkOption types;

  # The same paths as systemd/ and the commands' defaults.
  helperSocket = "/run/gcroots/helper.sock";
  daemonSocket = "/run/gcroots/gcrootsd.sock";
  # Nix >= 2.34's `nix store roots-daemon` endpoint (<state>/gc-roots-socket/socket).
  nixRootsSocket = "/nix/var/nix/gc-roots-socket/socket";
  defaultMetricsFile = "/var/lib/gcroots/metrics/gcroots.prom";

  helperExe = lib.getExe' cfg.helperPackage "gcroots-helper";
  daemonExe = lib.getExe' cfg.package "gcrootsd";
  queryExe = lib.getExe' cfg.package "gcroots-query";

  # Anything that makes gcrootsd delete store paths.
  collects = cfg.gc.automatic || cfg.gc.minFree != null || cfg.settings.gc-interval != null;

  # Whether /nix/store is a read-only mount.  nixpkgs replaced
  # boot.readOnlyNixStore by boot.nixStoreMountOpts; reading the removed option
  # would throw, so look at whichever this nixpkgs declares.
  storeMountedReadOnly =
    if options.boot ? nixStoreMountOpts then
      lib.elem "ro" config.boot.nixStoreMountOpts
    else
      config.boot.readOnlyNixStore or false;

  # RFC 42 settings -> gcrootsd's command line: `--name value`; true is
  # `--name`, false `--no-name` (the form of gcrootsd's boolean flags), null
  # leaves the flag out, a list repeats it.
  settingsToArgs =
    settings:
    lib.concatLists (
      lib.mapAttrsToList (
        name: value:
        if value == null then
          [ ]
        else if value == true then
          [ "--${name}" ]
        else if value == false then
          [ "--no-${name}" ]
        else if lib.isList value then
          lib.concatMap (v: [
            "--${name}"
            (toString v)
          ]) value
        else
          [
            "--${name}"
            (toString value)
          ]
      ) settings
    );

  # Flags the module sets itself; in settings they would contradict it.
  managedSettings = {
    socket = "gcrootsd is socket-activated (gcrootsd.socket); its own --socket would replace systemd's";
    socket-mode = "gcrootsd.socket sets the socket's mode";
    helper-socket = "the module connects gcrootsd to the helper's socket";
    admin-group = "use services.gcroots.adminGroup";
    min-free = "use services.gcroots.gc.minFree";
    max-free = "use services.gcroots.gc.maxFree";
    root = "the helper scans the real root; both must agree";
    store-dir = "the helper and the units assume /nix/store";
    state-dir = "the helper and the units assume /nix/var/nix";
  };
  misusedSettings = lib.filter (name: cfg.settings ? ${name}) (lib.attrNames managedSettings);

  # The helper accepts exactly these peers (besides root, which it always
  # accepts); systemd's socket permissions are the first gate, SO_PEERCRED the
  # second.
  helperPeers = lib.unique (
    [ cfg.user ]
    ++ lib.optional (
      cfg.nixRootsDaemonCompat.enable && cfg.nixRootsDaemonCompat.user != "root"
    ) cfg.nixRootsDaemonCompat.user
  );

  helperArgs = [
    helperExe
    "serve"
  ]
  ++ lib.concatMap (user: [
    "--allow-user"
    user
  ]) helperPeers
  ++ lib.concatMap (prefix: [
    "--accept-unreadable"
    prefix
  ]) cfg.acceptUnreadable
  # Under socket activation the sockets arrive as fds named `gcroots` and
  # `nix-roots`; `--socket`/`--nix-roots-daemon-socket` would make the helper
  # bind a second socket over systemd's, so they are not passed.
  ++ [ "--require-sandbox" ];

  daemonArgs = [
    daemonExe
    "--helper-socket"
    helperSocket
  ]
  ++ lib.optionals (cfg.adminGroup != null) [
    "--admin-group"
    cfg.adminGroup
  ]
  ++ lib.optionals (cfg.gc.minFree != null) [
    "--min-free"
    cfg.gc.minFree
  ]
  ++ lib.optionals (cfg.gc.maxFree != null) [
    "--max-free"
    cfg.gc.maxFree
  ]
  ++ settingsToArgs cfg.settings;

  prunes = cfg.gc.keep != null || cfg.gc.keepSince != null;
  agesRoots = cfg.gc.rootsOlderThan != null;

  # One command, one plan: profiles pruned, old result links removed, then
  # the collection (gcroots-query clean).
  gcArgs = [
    queryExe
    "--socket"
    daemonSocket
    "clean"
    "--yes"
  ]
  ++ lib.optionals (cfg.gc.keep != null) [
    "--keep"
    (toString cfg.gc.keep)
  ]
  ++ lib.optionals (cfg.gc.keepSince != null) [
    "--keep-since"
    cfg.gc.keepSince
  ]
  ++ lib.optionals agesRoots [
    "--roots-older-than"
    cfg.gc.rootsOlderThan
  ]
  ++ lib.optionals (cfg.gc.maxFreed != null) [
    "--max-freed"
    cfg.gc.maxFreed
  ];

  # gcrootsd must be up without a client when it collects or serves by itself.
  daemonAlwaysOn =
    cfg.gc.minFree != null || cfg.settings.gc-interval != null || cfg.settings.metrics-address != null;

  # What all three services share (systemd/*.service).  NixOS renders true
  # as "true", which systemd reads like the "yes" of the Debian units.
  # No PrivateTmp here: the helper must see the real /tmp (see below).
  confinement = {
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    PrivateDevices = true;
    DevicePolicy = "closed";
    PrivateNetwork = true;
    PrivateMounts = true;
    IPAddressDeny = "any";
    RestrictAddressFamilies = "AF_UNIX";
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    KeyringMode = "private";
    RemoveIPC = true;
    SystemCallArchitectures = "native";
    SystemCallErrorNumber = "EPERM";
  };

  # gcrootsd and the scheduled collection: no capabilities, no homes, no
  # other processes.
  unprivileged = confinement // {
    CapabilityBoundingSet = "";
    ProtectHome = true;
    # A writable /tmp of their own (SQLite's temporary files; ProtectSystem
    # makes the real one read-only).  Harmless for roots: the helper sees the
    # real /tmp; only gcrootsd's extra check before removing a stale
    # gcroots/auto link cannot see targets there.
    PrivateTmp = true;
    PrivateIPC = true;
    ProtectProc = "invisible";
    ProcSubset = "pid";
    SystemCallFilter = [
      "@system-service"
      "~@privileged @resources"
    ];
  };
in
{
  options.services.gcroots = {
    enable = lib.mkEnableOption "gcroots, the privilege-separated Nix garbage-collector root scanner (gcroots-helper and gcrootsd, socket-activated)";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nix/package.nix { }";
      description = "The gcroots package: gcrootsd, gcroots-query (also put on the system path) and gcroots-helper.";
    };

    helperPackage = mkOption {
      type = types.package;
      default = cfg.package.helper or cfg.package;
      defaultText = lib.literalExpression "config.services.gcroots.package.helper";
      description = ''
        The build gcroots-helper runs from.  The default carries only the
        helper's own dependencies (not trio nor the daemon).  Inside its
        Landlock sandbox the helper can read only the store paths its code
        was loaded from: the interpreter's standard library, the Python
        packages it imports, libffi and the other shared objects it maps.
      '';
    };

    user = mkOption {
      type = types.str;
      default = "gcroots";
      example = "root";
      description = ''
        User gcrootsd (and the scheduled collection) runs as; only this user
        may connect to the helper.  The user is created when it is the
        default.

        gcrootsd reads the Nix database for queries, but deletes garbage only
        as the owner of the store (see {option}`services.gcroots.storeOwner`).
        On a standard NixOS system root owns the store, so collecting
        (`gc.automatic`, `gc.minFree`, `settings.gc-interval`) needs
        `user = "root"` (the stock model): gcrootsd then runs as uid 0
        without any capability (an empty bounding set), with every path
        read-only except the store, /nix/var/nix and its state directory, no
        network and the same system call filter.  With an unprivileged Nix
        daemon ({option}`nix.daemonUser`, the rootless model), use that
        user.  The default suits query-only use (roots, dead, why, cost,
        metrics) on a root-owned store.
      '';
    };

    group = mkOption {
      type = types.str;
      default = "gcroots";
      description = "Primary group of gcrootsd and of its sockets (created when it is the default).";
    };

    storeOwner = mkOption {
      type = types.str;
      default = config.nix.daemonUser or "root";
      defaultText = lib.literalExpression ''config.nix.daemonUser or "root"'';
      description = ''
        Who owns /nix/store and the Nix database: root with the standard
        nix-daemon, {option}`nix.daemonUser` with an unprivileged one.  Only
        used to refuse a configuration in which gcrootsd would be asked to
        collect garbage it is not allowed to delete.
      '';
    };

    helperUser = mkOption {
      type = types.str;
      default = "gcroots-helper";
      description = ''
        User gcroots-helper runs as (created, with a group of the same name,
        when it is the default).  It gets exactly two capabilities from systemd,
        CAP_DAC_READ_SEARCH and CAP_SYS_PTRACE, to read `result` links in
        private homes and other users' /proc entries, and nothing else.
      '';
    };

    acceptUnreadable = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "/home" ];
      description = ''
        Path prefixes below which gcroots-helper may skip what it cannot read
        (EACCES: NFS homes with root_squash, a FUSE mount) instead of failing
        every scan (`--accept-unreadable`).  A root behind such a path is
        then missed and its store paths can be collected: accept that risk
        only for prefixes where it cannot matter.  The helper logs this
        choice at every scan.
      '';
    };

    adminGroup = mkOption {
      type = types.nullOr types.str;
      default = "gcroots-admin";
      example = "wheel";
      description = ''
        Members may collect garbage through gcrootsd and see every root's
        label; other users get read-only answers with runtime and temporary
        roots' labels censored.  The group is created if missing.  `null`:
        only root and {option}`services.gcroots.user`.
      '';
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf (
          types.nullOr (
            types.oneOf [
              types.bool
              types.int
              types.str
              (types.listOf types.str)
            ]
          )
        );

        options = {
          metrics-file = mkOption {
            type = types.nullOr types.str;
            default = defaultMetricsFile;
            description = "Prometheus metrics for node_exporter's textfile collector (`--metrics-file`); null for none.";
          };

          metrics-address = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "127.0.0.1:9847";
            description = ''
              Serve Prometheus metrics over HTTP (`--metrics-address [HOST:]PORT`).
              This opens gcrootsd's network to loopback only
              (`IPAddressAllow = [ "localhost" ]`); scrapes from other hosts
              stay blocked unless you add their addresses as list entries,
              e.g. `systemd.services.gcrootsd.serviceConfig.IPAddressAllow = [ "10.0.0.0/8" ];`,
              which NixOS appends to the module's (a string instead of a list
              would conflict with it).
            '';
          };

          gc-interval = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "1d";
            description = "Let gcrootsd also collect on this interval (`--gc-interval`); the timer ({option}`services.gcroots.gc.automatic`) is the usual way.";
          };

          keep-outputs = mkOption {
            type = types.nullOr types.bool;
            default = null;
            description = "Override nix.conf's keep-outputs (null: read nix.conf, as Nix does).";
          };

          keep-derivations = mkOption {
            type = types.nullOr types.bool;
            default = null;
            description = "Override nix.conf's keep-derivations (null: read nix.conf, as Nix does).";
          };

          log-level = mkOption {
            type = types.enum [
              "debug"
              "info"
              "warning"
              "error"
            ];
            default = "info";
            description = "gcrootsd's log level (JSON lines in the journal).";
          };
        };
      };
      default = { };
      example = lib.literalExpression ''
        {
          metrics-interval = "1min";
          keep-outputs = true;
        }
      '';
      description = ''
        gcrootsd's command-line flags (see `gcrootsd --help`), without the
        leading `--`: `name = value` becomes `--name value`, `true` `--name`,
        `false` `--no-name`, `null` nothing, and a list repeats the flag.
        Flags the module sets itself (sockets, the admin group, min/max free
        space, store and state directories) are refused here.
      '';
    };

    gc = {
      automatic = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Collect garbage through gcrootsd on a schedule
          (`gcroots-gc.timer`), after pruning profile generations when
          {option}`services.gcroots.gc.keep` or
          {option}`services.gcroots.gc.keepSince` is set.  Replaces
          {option}`nix.gc.automatic`, which must then be off.
        '';
      };

      dates = mkOption {
        type = types.singleLineStr;
        default = "daily";
        example = "weekly";
        description = "When to collect: a calendar event in the format of {manpage}`systemd.time(7)`.";
      };

      randomizedDelaySec = mkOption {
        type = types.singleLineStr;
        default = "1h";
        example = "0";
        description = "A random delay up to this time span ({manpage}`systemd.time(7)`) before each scheduled collection.";
      };

      persistent = mkOption {
        type = types.bool;
        default = true;
        description = "Run a collection missed while the machine was off when it is next up (the timer's `Persistent=`).";
      };

      maxFreed = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "50G";
        description = "Stop a scheduled collection after freeing this much (`gcroots-query gc --max-freed`).";
      };

      minFree = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10G";
        description = ''
          Let gcrootsd collect by itself whenever the store's file system has
          less free space than this (`gcrootsd --min-free`).  gcrootsd then
          runs from boot.
        '';
      };

      maxFree = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "50G";
        description = "With {option}`services.gcroots.gc.minFree`: collect until this much is free (`gcrootsd --max-free`; default: minFree).";
      };

      keep = mkOption {
        type = types.nullOr types.ints.positive;
        default = null;
        example = 5;
        description = ''
          Before each scheduled collection, delete profile generations beyond
          the newest N (`gcroots-query clean --keep N`).  The
          current generation, those /run/current-system and
          /run/booted-system point at, and any a running process uses are
          always kept.  Pruning runs as {option}`services.gcroots.user`, with
          its rights: profiles it may not modify are skipped.  Boot entries of
          deleted system generations go at the next `nixos-rebuild boot` or
          `switch`.
        '';
      };

      keepSince = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "30d";
        description = "Also keep generations newer than this (`--keep-since`, e.g. 14d, 2w); with `keep`, the union of both is kept.";
      };

      rootsOlderThan = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "90d";
        description = ''
          Before each scheduled collection, remove `result` and direnv links
          (indirect roots) made longer ago than this
          (`gcroots-query clean --roots-older-than`), never one a running
          process or a current profile generation needs, nor one whose
          directory path goes through a symbolic link.  With
          {option}`services.gcroots.user` = "root" (the stock model) every
          user's: the collection's unit then sees the real homes and /tmp,
          may write there and holds CAP_DAC_OVERRIDE and CAP_FOWNER (to enter
          0700 homes and unlink in sticky /tmp).  Any other user removes
          only its own links.
        '';
      };
    };

    nixRootsDaemonCompat = {
      enable = mkOption {
        type = types.bool;
        default = false;
        description = ''
          Also serve Nix >= 2.34's roots-daemon protocol on
          ${nixRootsSocket}, so that an unprivileged nix-daemon
          (`use-roots-daemon`, set by nixpkgs when {option}`nix.daemonUser`
          is not root) gets complete root sets from gcroots-helper instead of
          `nix store roots-daemon`, whose socket this replaces.  On failure
          the helper answers with a line that is not a store path, which makes
          Nix's collection abort instead of deleting with too few roots.
        '';
      };

      user = mkOption {
        type = types.str;
        default = config.nix.daemonUser or "root";
        defaultText = lib.literalExpression ''config.nix.daemonUser or "root"'';
        description = "The nix-daemon's user: the socket's owner, and the only other peer the helper accepts.";
      };
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = collects -> !config.nix.gc.automatic;
        message = ''
          services.gcroots collects garbage (gc.automatic, gc.minFree or
          settings.gc-interval) and so does nix.gc.automatic: run one
          collector, set nix.gc.automatic = false.
        '';
      }
      {
        assertion = collects -> cfg.user == cfg.storeOwner;
        message = ''
          services.gcroots: gcrootsd can delete garbage only as the owner of
          the Nix store, which here is "${cfg.storeOwner}"
          (services.gcroots.storeOwner), but it runs as "${cfg.user}".  Set
          services.gcroots.user = "${cfg.storeOwner}" (it then runs without
          any capability, in the same confined unit), or turn off gc.automatic,
          gc.minFree and settings.gc-interval to use gcrootsd for queries only.
        '';
      }
      {
        assertion = collects -> !storeMountedReadOnly;
        message = ''
          services.gcroots: /nix/store is mounted read-only (boot.nixStoreMountOpts
          contains "ro").  Nix remounts it writable in its own mount namespace
          with CAP_SYS_ADMIN; gcrootsd has no capabilities, and systemd cannot
          give a service a writable view of a read-only mount (a bind mount
          keeps the read-only flag; BindPaths=/nix/store does not help).  To
          let gcrootsd collect, set boot.nixStoreMountOpts = [ "nodev" "nosuid" ]
          (what nixpkgs does for an unprivileged nix-daemon).
        '';
      }
      {
        assertion = cfg.gc.maxFree != null -> cfg.gc.minFree != null;
        message = "services.gcroots.gc.maxFree needs gc.minFree: gcrootsd collects up to maxFree once free space falls below minFree.";
      }
      {
        assertion = (prunes || agesRoots) -> cfg.gc.automatic;
        message = "services.gcroots.gc.keep, gc.keepSince and gc.rootsOlderThan prune profiles and links before the scheduled collection: set services.gcroots.gc.automatic = true.";
      }
      {
        assertion = cfg.helperUser != cfg.user;
        message = "services.gcroots.helperUser must differ from services.gcroots.user: the helper's privileges are what the split keeps away from gcrootsd.";
      }
      {
        assertion = misusedSettings == [ ];
        message = lib.concatMapStringsSep "\n" (
          name: "services.gcroots.settings.${name}: ${managedSettings.${name}}."
        ) misusedSettings;
      }
    ];

    warnings =
      lib.optional (cfg.nixRootsDaemonCompat.enable && cfg.nixRootsDaemonCompat.user == "root") ''
        services.gcroots.nixRootsDaemonCompat: the nix-daemon runs as root and
        scans /proc itself; it uses ${nixRootsSocket} only with
        use-roots-daemon (an unprivileged daemon, nix.daemonUser).
      ''
      ++ lib.optional (collects && (config.nix.settings.min-free or null) != null) ''
        services.gcroots: Nix also collects garbage by itself during builds
        when free space falls below nix.settings.min-free.
      '';

    environment.systemPackages = [ cfg.package ];

    users.users = lib.mkMerge [
      (lib.mkIf (cfg.user == "gcroots") {
        gcroots = {
          isSystemUser = true;
          inherit (cfg) group;
          home = "/var/lib/gcroots";
          description = "gcrootsd, the unprivileged Nix GC daemon";
        };
      })
      (lib.mkIf (cfg.helperUser == "gcroots-helper") {
        gcroots-helper = {
          isSystemUser = true;
          group = "gcroots-helper";
          description = "gcroots-helper, the read-only Nix GC root scanner";
        };
      })
    ];

    users.groups = lib.mkMerge [
      (lib.mkIf (cfg.group == "gcroots") { gcroots = { }; })
      (lib.mkIf (cfg.helperUser == "gcroots-helper") { gcroots-helper = { }; })
      (lib.mkIf (cfg.adminGroup != null) { ${cfg.adminGroup} = { }; })
    ];

    systemd.sockets.gcroots-helper = {
      description = "gcroots privileged GC root scanner (socket for gcrootsd)";
      documentation = [ "https://github.com/gcroots/gcroots#security-model" ];
      wantedBy = [ "sockets.target" ];
      listenStreams = [ helperSocket ];
      socketConfig = {
        FileDescriptorName = "gcroots";
        # Only gcrootsd's user may even connect; the helper checks SO_PEERCRED too.
        SocketUser = cfg.user;
        SocketGroup = cfg.group;
        SocketMode = "0600";
        RemoveOnStop = true;
      };
    };

    systemd.sockets.gcroots-helper-nix-roots = lib.mkIf cfg.nixRootsDaemonCompat.enable {
      description = "gcroots-helper: Nix roots-daemon compatible endpoint";
      wantedBy = [ "sockets.target" ];
      listenStreams = [ nixRootsSocket ];
      socketConfig = {
        FileDescriptorName = "nix-roots";
        Service = "gcroots-helper.service";
        SocketUser = cfg.nixRootsDaemonCompat.user;
        SocketMode = "0600";
        RemoveOnStop = true;
      };
    };

    # nixpkgs' unprivileged nix-daemon set-up declares `nix store roots-daemon`
    # on the same path; ours takes its place (enable = false masks the unit).
    systemd.sockets.nix-roots-daemon = lib.mkIf cfg.nixRootsDaemonCompat.enable {
      enable = false;
    };

    systemd.services.gcroots-helper = {
      description = "gcroots privileged GC root scanner (read-only, sandboxed)";
      documentation = [ "https://github.com/gcroots/gcroots#security-model" ];
      requires = [ "gcroots-helper.socket" ];
      after = [ "gcroots-helper.socket" ];
      serviceConfig = confinement // {
        Type = "simple";
        ExecStart = utils.escapeSystemdExecArgs helperArgs;
        Sockets = [
          "gcroots-helper.socket"
        ]
        ++ lib.optional cfg.nixRootsDaemonCompat.enable "gcroots-helper-nix-roots.socket";
        Restart = "on-failure";

        # Reading is all it does: a dedicated user holding only the two
        # capabilities that reading other users' homes and /proc needs (not
        # root: no uid 0 ownership either).  The helper also confines itself
        # (Landlock, seccomp, no_new_privs) and refuses to serve if it cannot.
        User = cfg.helperUser;
        Group = config.users.users.${cfg.helperUser}.group or cfg.helperUser;
        CapabilityBoundingSet = "CAP_DAC_READ_SEARCH CAP_SYS_PTRACE";
        AmbientCapabilities = "CAP_DAC_READ_SEARCH CAP_SYS_PTRACE";
        # Homes are read (links only; Landlock keeps file contents closed),
        # and other users' /proc entries: no ProtectProc, no PrivateIPC needed.
        # Read-only views of the real /tmp and homes, never private or empty
        # ones (no PrivateTmp): `nix-build -o /tmp/ci-job/result` and links in
        # homes are indirect roots, and a link whose target we cannot see
        # looks stale, its path garbage.  The helper refuses to scan then.
        ProtectHome = "read-only";
        UMask = "0077";
        # @system-service of older systemd lacks the Landlock calls; capset
        # lets the helper clear the inheritable and ambient sets it starts with.
        SystemCallFilter = [
          "@system-service landlock_create_ruleset landlock_add_rule landlock_restrict_self"
          "~@privileged @resources"
          "capset"
        ];
        LimitNOFILE = 65536;
      };
    };

    systemd.sockets.gcrootsd = {
      description = "gcrootsd admin socket";
      wantedBy = [ "sockets.target" ];
      listenStreams = [ daemonSocket ];
      socketConfig = {
        FileDescriptorName = "gcrootsd";
        # Every local user may ask; gcrootsd authorizes each peer
        # (SO_PEERCRED): root, its own user and the admin group get
        # everything, others censored read-only answers.
        SocketMode = "0666";
        SocketUser = cfg.user;
        SocketGroup = cfg.group;
        RemoveOnStop = true;
      };
    };

    systemd.services.gcrootsd = {
      description = "gcroots daemon: Nix GC roots, live/dead, garbage collection (unprivileged)";
      documentation = [ "https://github.com/gcroots/gcroots" ];
      requires = [ "gcrootsd.socket" ];
      wants = [ "gcroots-helper.socket" ];
      after = [
        "gcrootsd.socket"
        "gcroots-helper.socket"
      ];
      # Socket activation starts it on the first query; it must also run
      # without one when it collects or serves metrics by itself.
      wantedBy = lib.optional daemonAlwaysOn "multi-user.target";
      serviceConfig =
        unprivileged
        // {
          Type = "notify";
          NotifyAccess = "main";
          # Nix settings from /etc/nix/nix.conf only: ProtectHome hides every
          # home's ~/.config/nix/nix.conf (root's included).
          Environment = "NIX_USER_CONF_FILES=";
          ExecStart = utils.escapeSystemdExecArgs daemonArgs;
          Restart = "on-failure";
          WatchdogSec = 60;
          # One fd per client connection (capped per user and in total).
          LimitNOFILE = 65536;
          User = cfg.user;
          Group = cfg.group;
          StateDirectory = "gcroots";
          # The store owner's writes: deleting garbage, gc.lock, temproots,
          # the gc socket, stale gcroots/auto links.
          ReadWritePaths = [
            "/nix/store"
            "/nix/var/nix"
          ];
          AmbientCapabilities = "";
          # Metrics are written for node_exporter (another user) to read.
          UMask = "0022";
        }
        # prometheus-client's HTTP server needs a TCP socket: loopback only.
        # (`//`, not mkMerge: PrivateNetwork would conflict.)  A list, so
        # that a configuration's own entries are appended, not in conflict.
        // lib.optionalAttrs (cfg.settings.metrics-address != null) {
          PrivateNetwork = false;
          RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6";
          IPAddressAllow = [ "localhost" ];
        };
    };

    systemd.services.gcroots-gc = {
      description = "Scheduled Nix garbage collection through gcrootsd";
      documentation = [ "https://github.com/gcroots/gcroots#garbage-collection" ];
      requires = [ "gcrootsd.socket" ];
      after = [ "gcrootsd.socket" ];
      serviceConfig =
        unprivileged
        // {
          Type = "oneshot";
          # As gcrootsd's own user, which gcrootsd lets collect.  Generations
          # and links go first, so their closures are collected in the same
          # run; clean asks gcrootsd which paths running processes use and
          # deletes nothing without that answer.
          ExecStart = utils.escapeSystemdExecArgs gcArgs;
          User = cfg.user;
          Group = cfg.group;
          UMask = "0077";
        }
        // lib.optionalAttrs (prunes || agesRoots) {
          ReadWritePaths =
            lib.optional prunes "/nix/var/nix/profiles"
            ++ lib.optionals agesRoots [
              "-/home"
              "-/root"
              "-/tmp"
              "-/var/tmp"
            ];
        }
        // lib.optionalAttrs (agesRoots && cfg.user == "root") {
          # Users' result links: in their (0700) homes and in the real,
          # sticky /tmp.
          ProtectHome = false;
          PrivateTmp = false;
          CapabilityBoundingSet = "CAP_DAC_OVERRIDE CAP_FOWNER";
        };
    };

    systemd.timers.gcroots-gc = lib.mkIf cfg.gc.automatic {
      description = "Scheduled Nix garbage collection through gcrootsd";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.gc.dates;
        RandomizedDelaySec = cfg.gc.randomizedDelaySec;
        Persistent = cfg.gc.persistent;
      };
    };
  };
}
