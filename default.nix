# Without flakes: `nix-build` builds Nixery against <nixpkgs> (or the `pkgs`
# given), e.g. `nix-build -E 'import ./. { pkgs = import <nixos-24.11> { }; }'`.
{
  pkgs ? import <nixpkgs> { },
}:
pkgs.callPackage ./nix/pkgs/nixery.nix { }
