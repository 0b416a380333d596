# An overlay given as a directory: it imports a file beside it, which a copy
# of this file alone would not have.
final: prev: {
  internal-tool = final.callPackage ./internal-tool.nix { };
}
