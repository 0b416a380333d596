final: _prev: {
  nixery = final.callPackage ./pkgs/nixery.nix { };
}
