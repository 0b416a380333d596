# The versions nixpkgs has of Python and of the given python3Packages
# attributes (null for an attribute it lacks).
#   nix-instantiate --eval --strict --json tests/nixos/eval-python-versions.nix \
#     --argstr nixpkgs /path/to/nixpkgs --argstr namesJSON '["click"]'
{
  nixpkgs,
  namesJSON,
}:

let
  pkgs = import nixpkgs {
    config = { };
    overlays = [ ];
  };
  version = name: pkgs.python3Packages.${name}.version or null;
in
{
  python = pkgs.python3.version;
  packages = builtins.listToAttrs (
    map (name: {
      inherit name;
      value = version name;
    }) (builtins.fromJSON namesJSON)
  );
}
