# Evaluates nix/pkgs/nixery.nix with nixpkgs' lib and a python3Packages that
# holds exactly the attributes named in `expectedJSON` (a JSON list of
# nixpkgs attribute names): a dependency the expression maps to any other
# name fails the evaluation.
{
  libPath,
  expectedJSON,
}:

let
  lib = import libPath;
  storePath = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";
  python3Packages =
    lib.genAttrs (builtins.fromJSON expectedJSON) (name: "python3Packages.${name}")
    // {
      buildPythonApplication = attrs: attrs;
      python.sitePackages = "lib/python3/site-packages";
    };
  package = import ../../nix/pkgs/nixery.nix {
    inherit lib python3Packages;
    nix = storePath "nix";
    git = storePath "git";
  };
in
# `src` is left out: lib.fileset needs a newer Nix than some hosts have.
removeAttrs package [ "src" ]
