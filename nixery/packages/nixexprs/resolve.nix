# Resolves image package names in a package set.
#
# Everything request-derived arrives as JSON data in `argsFile`; this file is
# the only Nix code that runs, so a package name can never become Nix source.
#
# args = {
#   source   = { kind = "path"; path = "/abs/path"; }
#           or { kind = "flake"; url = "<locked flake URL>"; };
#   system   = "x86_64-linux";
#   overlays = [ "/abs/overlay.nix" ... ];
#   packages = [ "hello" "haskellPackages.pandoc" ... ];
#   describe = true;        # optional: add `version` and `description`
#   listAttributes = true;  # optional: add the set's top-level names
#   explain = true;         # optional: fail with the error of the first refused name
#   metadata = true;        # optional: add `metadata`, see below
#   instantiate = true;     # optional: return the result inside a derivation, see below
# }
#
# Result: { unknown = [ name ... ]; refused = [ name ... ]; packages = [ {
# name, attrPath, drv, out, output } ... ]; } where `unknown` lists every
# name that does not resolve to a derivation and `refused` every name that
# exists but throws when evaluated (an unfree, broken or insecure package, a
# removed alias); `overlaysApplied` says how the overlays were applied
# ("none", "overlays-argument", "appendOverlays" or "on-top"); with
# `listAttributes`, also `attributes`. With `metadata`, also `metadata`: for
# the packages found and every derivation they were built from, one entry
# per output: { path, output, name, version, licenses (SPDX ids), homepage,
# description, source } (the software bill of materials reads it; a value
# that is missing or fails to evaluate is null).
#
# With `instantiate`, the result comes as a derivation that is never built:
# its `result` is the result as JSON, and it refers to the derivations of the
# packages found (their .drv files, not their outputs). `nix-instantiate
# --add-root` writes it and roots it in the evaluating process, which holds
# Nix's temporary roots on every .drv it wrote until then, so the garbage
# collector never sees the packages' derivations unrooted before they are
# built; `nix-store --query --binding result` reads the result back.
{ argsFile }:
let
  args = builtins.fromJSON (builtins.readFile argsFile);

  # A flake's package set: legacyPackages (as nixpkgs has it) or packages.
  flakePackages = flake:
    flake.legacyPackages.${args.system} or flake.packages.${args.system}
      or (throw "nixery: the flake has no legacyPackages or packages for ${args.system}");

  loadSource = source:
    if source.kind == "path" then import source.path
    else if source.kind == "flake" then flakePackages (builtins.getFlake source.url)
    else throw "nixery: unsupported package source kind ${source.kind}";

  overlays = map import (args.overlays or [ ]);

  # How the overlays reach the set; reported as `overlaysApplied`.
  # A function that declares `overlays` takes them itself (nixpkgs does).
  # Any other set gets them from outside: nixpkgs-like sets know
  # `appendOverlays`; otherwise they are laid on top, so an overlay's `final`
  # sees the result but packages already in the set do not pick up its
  # overrides. A function that only has `...` would drop an `overlays`
  # argument silently, so it is never given one.
  takesOverlays = f: (builtins.functionArgs f) ? overlays;

  onTop = set:
    let fix = f: let x = f x; in x;
    in fix (final: builtins.foldl' (prev: overlay: prev // overlay final prev) set overlays);

  applyOutside = set:
    if set ? appendOverlays
    then { pkgs = set.appendOverlays overlays; mode = "appendOverlays"; }
    else { pkgs = onTop set; mode = "on-top"; };

  imported = loadSource args.source;
  takes = builtins.isFunction imported && takesOverlays imported;
  called =
    if !builtins.isFunction imported then imported
    else imported ({ system = args.system; } // (if takes then { inherit overlays; } else { }));
  loaded =
    if overlays == [ ] then { pkgs = called; mode = "none"; }
    else if takes then { pkgs = called; mode = "overlays-argument"; }
    else applyOutside called;
  pkgs = loaded.pkgs;

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  # Registry names are lowercase, so an exact miss falls back to the first
  # (sorted) attribute whose lowercase form matches.
  findKey = set: name:
    if builtins.hasAttr name set then name
    else
      let matches = builtins.filter (n: toLower n == toLower name) (builtins.attrNames set);
      in if matches == [ ] then null else builtins.head matches;

  lookup = set: parts:
    if parts == [ ] then { found = true; value = set; path = [ ]; }
    else
      let
        ok = (builtins.tryEval (builtins.isAttrs set)).value or false;
        key = if ok then findKey set (builtins.head parts) else null;
        child = builtins.tryEval (builtins.getAttr key set);
        rest =
          if key == null then { found = false; }
          else if !child.success then { found = false; refused = true; }
          else lookup child.value (builtins.tail parts);
      in
      if rest.found then rest // { path = [ key ] ++ rest.path; } else rest;

  # The same walk without tryEval, so that Nix reports a refused name's error.
  force = set: parts:
    if parts == [ ] then set.drvPath
    else force (builtins.getAttr (findKey set (builtins.head parts)) set) (builtins.tail parts);

  splitName = name: builtins.filter builtins.isString (builtins.split "\\." name);

  isDerivation = v: builtins.isAttrs v && (v.type or null) == "derivation";

  # Metadata is informative only: a value that fails to evaluate is null.
  stringOrNull = v: let t = builtins.tryEval v; in
    if t.success && builtins.isString t.value then t.value else null;
  describe = v: {
    version = stringOrNull (v.version or null);
    description = stringOrNull (v.meta.description or null);
  };

  # `tryEval` catches `throw` and `assert` only, so every value is checked
  # for its type before it is used.
  safe = f: v: let t = builtins.tryEval (f v); in t.success && t.value;

  # Metadata of the build graph, walked through the derivations' arguments
  # (where nixpkgs keeps build inputs, `src` and `stdenv`): evaluating
  # `drvPath` has forced all of them already, so the walk costs little.
  inputsOf = drv:
    let
      attrs = drv.drvAttrs or { };
      values = if safe builtins.isAttrs attrs then builtins.attrValues attrs else [ ];
      expand = v:
        if safe isDerivation v then [ v ]
        else if safe builtins.isList v then builtins.filter (safe isDerivation) v
        else [ ];
    in
    builtins.concatMap expand values;
  keyOf = drv:
    let p = stringOrNull (drv.drvPath or null);
    in if p == null then null else builtins.unsafeDiscardStringContext p;
  graphNode = drv: { key = keyOf drv; inherit drv; };
  buildGraph = roots:
    builtins.filter (n: n.key != null) (builtins.genericClosure {
      startSet = builtins.filter (n: n.key != null) (map graphNode roots);
      operator = node: builtins.filter (n: n.key != null) (map graphNode (inputsOf node.drv));
    });

  listOf = v: if safe builtins.isList v then v else [ v ];
  spdxId = l: if safe builtins.isAttrs l then stringOrNull (l.spdxId or null) else null;
  spdxIds = license: builtins.filter (id: id != null) (map spdxId (listOf license));
  firstString = v:
    let l = builtins.filter (safe builtins.isString) (listOf v);
    in if l == [ ] then null else builtins.head l;
  # nixpkgs' fetchurl keeps `mirror://site/file` URLs; they are resolved with
  # the set's own list of mirrors (the first of each site), when it has one.
  mirrorsFile = if safe builtins.isPath (pkgs.path or null)
    then pkgs.path + "/pkgs/build-support/fetchurl/mirrors.nix" else null;
  mirrors = if mirrorsFile != null && builtins.pathExists mirrorsFile
    then import mirrorsFile else { };
  resolveMirror = url:
    let m = builtins.match "mirror://([^/]+)/(.*)" url;
    in if m == null then url
    else let site = mirrors.${builtins.head m} or [ ]; in
      if safe builtins.isList site && site != [ ] && safe builtins.isString (builtins.head site)
      then builtins.head site + builtins.elemAt m 1
      else null;
  sourceUrl = drv:
    let
      src = drv.src or null;
      url = if safe builtins.isAttrs src then firstString (src.urls or src.url or null) else null;
    in
    if url == null then null else resolveMirror url;
  outputsOf = drv:
    let o = drv.outputs or [ "out" ]; in
    if safe builtins.isList o then builtins.filter (safe builtins.isString) o else [ "out" ];
  metadataOf = drv:
    let
      meta = if safe builtins.isAttrs (drv.meta or null) then drv.meta else { };
      about = {
        name = stringOrNull (drv.pname or null);
        version = stringOrNull (drv.version or null);
        licenses = spdxIds (meta.license or [ ]);
        homepage = firstString (meta.homepage or null);
        description = stringOrNull (meta.description or null);
        source = sourceUrl drv;
      };
      entry = output:
        let path = stringOrNull (drv.${output}.outPath or null);
        in if path == null then null
        else about // { inherit output; path = builtins.unsafeDiscardStringContext path; };
    in
    builtins.filter (e: e != null) (map entry (outputsOf drv));
  collectMetadata = roots: builtins.concatMap (n: metadataOf n.drv) (buildGraph roots);

  refuse = name:
    if args.explain or false
    then builtins.seq (force pkgs (splitName name)) { inherit name; refused = true; }
    else { inherit name; refused = true; };

  resolve = name:
    let
      r = lookup pkgs (splitName name);
      isDrv = builtins.tryEval (isDerivation r.value);
      drv = builtins.tryEval r.value.drvPath;
    in
    if !r.found then (if r.refused or false then refuse name else { inherit name; unknown = true; })
    else if !isDrv.success then refuse name
    else if !isDrv.value then { inherit name; unknown = true; }
    else if !drv.success then refuse name
    else {
      inherit name;
      attrPath = builtins.concatStringsSep "." r.path;
      # Not `outPath`: an attrset with that key is serialised as a bare path.
      drv = builtins.unsafeDiscardStringContext drv.value;
      out = builtins.unsafeDiscardStringContext r.value.outPath;
      output = r.value.outputName or "out";
    } // (if args.describe or false then describe r.value else { });

  results = map resolve args.packages;
  found = builtins.filter (r: r ? drv) results;

  result = {
    unknown = map (r: r.name) (builtins.filter (r: r ? unknown) results);
    refused = map (r: r.name) (builtins.filter (r: r ? refused) results);
    packages = found;
    overlaysApplied = loaded.mode;
  } // (if args.listAttributes or false then { attributes = builtins.attrNames pkgs; } else { })
    // (if args.metadata or false
        then { metadata = collectMetadata (map (r: (lookup pkgs (splitName r.name)).value) found); }
        else { });

  # The .drv file itself (a plain store path): a reference, not a build input.
  drvFile = r: builtins.unsafeDiscardOutputDependency (lookup pkgs (splitName r.name)).value.drvPath;
in
if args.instantiate or false
then derivation {
  name = "nixery-resolution";
  inherit (args) system;
  builder = "nixery-resolution-is-never-built";
  result = builtins.toJSON result;
  derivations = map drvFile found;
}
else result
