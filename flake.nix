{
  description = "Nixery: a container registry that builds images on demand with Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        nixery = pkgs.callPackage ./nix/pkgs/nixery.nix { };
        default = nixery;
      });
      nixosModules = rec {
        nixery = import ./nix/modules/nixery.nix;
        default = nixery;
      };
    };
}
