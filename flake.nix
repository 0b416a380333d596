{
  description = "Nixery: a container registry that builds images on demand with Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      # Every file under nix/tests/ is a NixOS VM test.
      vmTests =
        pkgs:
        lib.mapAttrs' (
          file: _:
          lib.nameValuePair "vm-${lib.removeSuffix ".nix" file}" (
            import ./nix/tests/${file} {
              inherit pkgs;
              nixosModule = self.nixosModules.nixery;
            }
          )
        ) (lib.filterAttrs (file: _: lib.hasSuffix ".nix" file) (builtins.readDir ./nix/tests));
    in
    {
      packages = forAllSystems (
        system: pkgs: {
          nixery = pkgs.callPackage ./nix/pkgs/nixery.nix { };
          default = self.packages.${system}.nixery;
          # The container image deploy/kubernetes runs: Nixery with Nix inside.
          image = pkgs.callPackage ./nix/pkgs/image.nix { nixery = self.packages.${system}.nixery; };
        }
      );

      # `nix run .`: serve on port 8080, blobs under $XDG_CACHE_HOME/nixery,
      # and, unless a source is given, images from this flake's pinned nixpkgs
      # (a store path, so every image stays cacheable).
      apps = forAllSystems (
        system: pkgs: {
          default = {
            type = "app";
            program = lib.getExe (
              pkgs.writeShellApplication {
                name = "nixery-serve";
                text = ''
                  exec ${lib.getExe self.packages.${system}.nixery} serve --default-pkgs-path ${nixpkgs} "$@"
                '';
              }
            );
            meta.description = "Serve images built from this flake's nixpkgs on port 8080";
          };
        }
      );

      overlays.default = import ./nix/overlay.nix;

      nixosModules = {
        nixery =
          { lib, pkgs, ... }:
          {
            imports = [ ./nix/modules/nixery.nix ];
            services.nixery.package = lib.mkDefault (pkgs.callPackage ./nix/pkgs/nixery.nix { });
          };
        default = self.nixosModules.nixery;
      };

      checks = forAllSystems (
        system: pkgs:
        {
          package = self.packages.${system}.nixery;
          lint =
            pkgs.runCommand "nixery-lint"
              {
                nativeBuildInputs = [ pkgs.ruff ];
                src = lib.fileset.toSource {
                  root = ./.;
                  fileset = lib.fileset.unions [
                    ./pyproject.toml
                    ./nixery
                    ./tests
                    (lib.fileset.maybeMissing ./benchmarks)
                  ];
                };
              }
              # The import contracts (.importlinter) run in scripts/test only:
              # nixpkgs 24.11 has no import-linter.
              ''
                cd "$src"
                ruff check --no-cache .
                ruff format --no-cache --check .
                touch "$out"
              '';
        }
        // vmTests pkgs
      );

      devShells = forAllSystems (
        system: pkgs: {
          default = pkgs.mkShell {
            inputsFrom = [ self.packages.${system}.nixery ];
            packages = [
              pkgs.python3Packages.pytest
              pkgs.python3Packages.mypy
              pkgs.ruff
              pkgs.nix
              pkgs.git
              pkgs.skopeo
              pkgs.umoci
              pkgs.bubblewrap
              pkgs.podman
              pkgs.runc
            ];
          };
        }
      );

      formatter = forAllSystems (_system: pkgs: pkgs.nixfmt);
    };
}
