# A stand-in for the part of nixpkgs' `lib` that nix/*.nix use, built on
# builtins only, so that tests/test_nix_files.py can evaluate the module, the
# package and the VM test's node on a machine without nixpkgs.
#
# It is not nixpkgs: option types are checked shallowly, definitions are not
# merged by priority, and only the functions the files use exist.  A function
# the files start to use and this lacks is an evaluation error in the tests,
# which is the point: add it here, with nixpkgs' semantics.
let
  inherit (builtins)
    all
    any
    attrNames
    concatLists
    concatStringsSep
    elem
    filter
    foldl'
    genList
    head
    isAttrs
    isBool
    isFunction
    isInt
    isList
    isString
    length
    listToAttrs
    map
    toJSON
    typeOf
    ;

  mkType =
    name: check: extra:
    {
      _type = "option-type";
      inherit name check;
    }
    // extra;

  types = rec {
    bool = mkType "bool" isBool { };
    int = mkType "int" isInt { };
    str = mkType "str" isString { };
    singleLineStr = mkType "singleLineStr" (v: isString v && builtins.match "[^\n]*\n?" v != null) { };
    ints.positive = mkType "positive integer" (v: isInt v && v > 0) { };
    # Packages: the stand-ins of tests/nix/stub-pkgs.nix are attribute sets
    # with an outPath, like derivations.
    package = mkType "package" (v: isAttrs v && v ? outPath) { };
    enum = values: mkType "one of ${toJSON values}" (v: elem v values) { };
    nullOr = t: mkType "null or ${t.name}" (v: v == null || t.check v) { };
    listOf = t: mkType "list of ${t.name}" (v: isList v && all t.check v) { };
    attrsOf = t: mkType "attribute set of ${t.name}" (v: isAttrs v && all t.check (builtins.attrValues v)) { };
    oneOf = ts: mkType "one of ${concatStringsSep ", " (map (t: t.name) ts)}" (v: any (t: t.check v) ts) { };
    submodule =
      m:
      mkType "submodule" isAttrs {
        submodule = m;
      };
  };

  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  optionalAttrs = cond: attrs: if cond then attrs else { };

  # nixpkgs' lib.unique keeps the first occurrence, in order.
  unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];

  mapAttrsToList = f: attrs: map (name: f name attrs.${name}) (attrNames attrs);
in
{
  inherit
    all
    any
    attrNames
    concatLists
    concatStringsSep
    elem
    filter
    head
    isAttrs
    isBool
    isFunction
    isInt
    isList
    isString
    length
    optional
    optionals
    optionalAttrs
    types
    unique
    mapAttrsToList
    ;

  concatMap = f: xs: concatLists (map f xs);
  removePrefix =
    prefix: s:
    let
      n = builtins.stringLength prefix;
    in
    if builtins.substring 0 n s == prefix then builtins.substring n (-1) s else s;
  concatMapStringsSep = sep: f: xs: concatStringsSep sep (map f xs);
  genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
  range = first: last: genList (i: first + i) (last - first + 1);

  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption =
    name:
    {
      _type = "option";
      type = types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
    };
  literalExpression = text: {
    _type = "literalExpression";
    inherit text;
  };

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };
  mkMerge = contents: {
    _type = "merge";
    inherit contents;
  };
  mkOverride = priority: content: {
    _type = "override";
    inherit priority content;
  };
  mkDefault = content: {
    _type = "override";
    priority = 1000;
    inherit content;
  };
  mkForce = content: {
    _type = "override";
    priority = 50;
    inherit content;
  };

  # nixpkgs: "${lib.getBin x}/bin/${y}"; the stand-in packages have one output.
  getExe' = pkg: name: "${pkg}/bin/${name}";
  getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram}";
  getLib = pkg: pkg;

  importTOML = path: builtins.fromTOML (builtins.readFile path);

  # lib.fileset.toSource returns a store path of the selected files; here the
  # selection itself, for the tests to check against pyproject.toml.
  fileset = {
    unions = files: files;
    toSource =
      { root, fileset }:
      {
        _type = "fileset-source";
        inherit root fileset;
      };
  };

  licenses.mit = "mit";
  platforms.linux = [
    "x86_64-linux"
    "aarch64-linux"
  ];
}
