# Evaluates nix/module.nix without nixpkgs, for tests/test_nix_files.py:
# options with their defaults and types, definitions checked against them,
# mkIf/mkMerge/mkDefault/mkForce resolved, and the module's config returned.
#
# Deliberately small, so not nixpkgs' module system: no priorities (the
# module uses none), shallow type checks, and the module's own output is not
# fed back into `config` (it reads back only users.users.<helper>.group,
# with a fallback).  What it proves: the module evaluates, every option it
# reads exists, definitions have the declared names and types, and the
# generated units, assertions and warnings are what the tests inspect.
{
  # Definitions under services.gcroots, as a configuration would write them.
  gcroots ? { },
  # The rest of the configuration the module reads (nix.*, boot.*), and its
  # own systemd.* definitions (merged into the module's units).
  system ? { },
  # Whether this "nixpkgs" declares boot.nixStoreMountOpts (older ones have
  # boot.readOnlyNixStore instead).
  hasNixStoreMountOpts ? true,
}:
let
  lib = import ./stub-lib.nix;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  inherit (builtins)
    attrNames
    filter
    foldl'
    head
    intersectAttrs
    isAttrs
    isList
    mapAttrs
    removeAttrs
    toJSON
    ;

  # nixos/lib/utils.nix
  escapeSystemdExecArg =
    arg:
    let
      s =
        if builtins.isString arg then
          arg
        else if builtins.isInt arg || (isAttrs arg && arg ? outPath) then
          toString arg
        else
          throw "escapeSystemdExecArg only allows strings, paths, numbers and derivations";
    in
    builtins.replaceStrings [ "%" "$" ] [ "%%" "$$" ] (toJSON s);
  utils = {
    inherit escapeSystemdExecArg;
    escapeSystemdExecArgs = args: builtins.concatStringsSep " " (map escapeSystemdExecArg args);
  };

  absent = {
    _type = "absent";
  };
  isAbsent = v: isAttrs v && (v._type or null) == "absent";

  merge =
    a: b:
    if isAbsent a then
      b
    else if isAbsent b then
      a
    else if isAttrs a && isAttrs b && !(a ? outPath) then
      a // b // mapAttrs (n: _: merge a.${n} b.${n}) (intersectAttrs a b)
    else if isList a && isList b then
      a ++ b
    else if a == b then
      a
    else
      throw "conflicting definitions: ${toJSON a} and ${toJSON b}";

  # mkIf/mkMerge/mkOverride resolved, false conditions dropped.
  resolve =
    v:
    if !(isAttrs v) then
      v
    else if (v._type or null) == "if" then
      (if v.condition then resolve v.content else absent)
    else if (v._type or null) == "merge" then
      foldl' merge absent (map resolve v.contents)
    else if (v._type or null) == "override" then
      resolve v.content
    else if v ? outPath || v ? _type then
      v
    else
      let
        r = mapAttrs (_: resolve) v;
      in
      removeAttrs r (filter (n: isAbsent r.${n}) (attrNames r));

  # Definitions replace the defaults of the options they define (as option
  # defaults do in NixOS; merge would concatenate lists).
  update =
    defaults: defs:
    defaults
    // mapAttrs (
      n: v: if isAttrs v && isAttrs (defaults.${n} or null) && !(v ? outPath) then update defaults.${n} v else v
    ) defs;

  isOption = v: isAttrs v && (v._type or null) == "option";

  evalOptions =
    path: opts: defs:
    let
      unknown = filter (n: !(opts ? ${n})) (attrNames defs);
    in
    if unknown != [ ] then
      throw "The option `${path}.${head unknown}' does not exist."
    else
      mapAttrs (
        name: opt:
        if isOption opt then
          evalOption "${path}.${name}" opt (defs.${name} or absent)
        else
          evalOptions "${path}.${name}" opt (defs.${name} or { })
      ) opts;

  evalOption =
    path: opt: def:
    let
      sub = opt.type.submodule or null;
      value =
        if sub != null then
          evalSubmodule path sub (if isAbsent def then opt.default or { } else def)
        else if !(isAbsent def) then
          def
        else if opt ? default then
          opt.default
        else
          throw "The option `${path}' is used but not defined.";
    in
    if opt ? type && !(opt.type.check value) then
      throw "A definition for option `${path}' is not of type `${opt.type.name}': ${toJSON value}"
    else
      value;

  evalSubmodule =
    path: m: def:
    let
      declared = m.options or { };
      free = removeAttrs def (attrNames declared);
      freeType = m.freeformType or null;
    in
    if freeType == null && free != { } then
      throw "The option `${path}.${head (attrNames free)}' does not exist."
    else if freeType != null && !(freeType.check free) then
      throw "A definition for option `${path}' is not of type `${freeType.name}': ${toJSON free}"
    else
      free // evalOptions path declared (intersectAttrs declared def);

  nixosDefaults = {
    nix = {
      gc.automatic = false;
      settings = { };
    };
    boot =
      if hasNixStoreMountOpts then
        {
          nixStoreMountOpts = [
            "ro"
            "nodev"
            "nosuid"
          ];
        }
      else
        { readOnlyNixStore = true; };
    users.users = { };
  };

  options.boot = if hasNixStoreMountOpts then { nixStoreMountOpts = { }; } else { readOnlyNixStore = { }; };

  config = update nixosDefaults (resolve system) // {
    services.gcroots = cfg;
  };

  module = import ../../nix/module.nix {
    inherit
      config
      lib
      options
      pkgs
      utils
      ;
  };

  cfg = evalOptions "services.gcroots" module.options.services.gcroots (resolve gcroots);

  optionList =
    path: opts:
    builtins.concatLists (
      map (
        name:
        let
          opt = opts.${name};
          p = "${path}.${name}";
        in
        if isOption opt then
          [
            {
              name = p;
              type = opt.type.name;
              description = opt.description or null;
              hasDefault = opt ? default;
            }
          ]
          ++ (
            if opt.type ? submodule then
              optionList p (opt.type.submodule.options or { })
            else
              [ ]
          )
        else
          optionList p opt
      ) (attrNames opts)
    );

  out = resolve module.config;
  # A configuration's own systemd.* definitions merged into the module's, as
  # NixOS merges unit options: lists are appended, unequal values conflict.
  withSystemd = if isAbsent out || !(system ? systemd) then out else merge out { inherit (system) systemd; };
in
{
  inherit cfg;
  options = optionList "services.gcroots" module.options.services.gcroots;
  config = if isAbsent out then { } else withSystemd;
}
