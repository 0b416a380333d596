# Real NixOS systems (nixpkgs' own module system and packages) with the
# module, as users set them up; everything the tests check from one
# evaluation, with `--read-write-mode` so the derivations are instantiated.
#   nix-instantiate --eval --strict --json --read-write-mode \
#     tests/nixos/eval-nixos.nix --argstr nixpkgs /path/to/nixpkgs-24.11
{
  nixpkgs,
  system ? "x86_64-linux",
}:

let
  lib = import "${nixpkgs}/lib";

  # What every system needs to evaluate without hardware.
  base = {
    boot.loader.grub.enable = false;
    fileSystems."/".device = "/dev/sda";
    system.stateVersion = "24.11";
    nixpkgs.overlays = [ noShellcheck ];
  };

  # Without flakes: the module from a checkout, the package from the overlay.
  nonFlake = {
    imports = [ ../../nix/modules/nixery.nix ];
    nixpkgs.overlays = [ (import ../../nix/overlay.nix) ];
  };

  # The flake's module, with the flake's nixpkgs input being this tree.
  flake = import ../../flake.nix;
  self = flake.outputs {
    inherit self;
    nixpkgs = {
      inherit lib;
      outPath = nixpkgs;
      legacyPackages = { };
    };
  };

  variants = {
    defaults = [
      nonFlake
      { services.nixery.enable = true; }
    ];
    flake = [
      self.nixosModules.default
      { services.nixery.enable = true; }
    ];
    s3 = [
      nonFlake
      {
        services.nixery = {
          enable = true;
          storage = {
            backend = "s3";
            s3 = {
              bucket = "images";
              endpoint = "https://s3.example.org";
              region = "eu-west-1";
              credentialsFile = "/run/secrets/nixery-s3";
            };
          };
          environmentFile = "/run/secrets/nixery.env";
          gc = {
            enable = true;
            dates = "hourly";
            keepDays = 7;
          };
        };
      }
    ];
    channel = [
      nonFlake
      {
        services.nixery = {
          enable = true;
          channel = "nixos-24.11";
          overlays = [ ./overlay ];
          port = 80;
          openFirewall = true;
          layerBudget = 124;
          nixTimeout = 300;
        };
      }
    ];
  };

  # The tree lacks Haskell's package list, so shellcheck cannot be
  # evaluated: this takes nixpkgs' own path for platforms without it
  # (writeShellApplication then skips its check).
  noShellcheck = _final: _prev: { shellcheck-minimal.compiler.meta.platforms = [ ]; };

  # nix/tests/registry.nix, as the flake's checks call it.
  vmTest = import ../../nix/tests/registry.nix {
    pkgs = import nixpkgs {
      inherit system;
      config = { };
      overlays = [ noShellcheck ];
    };
    nixosModule = self.nixosModules.nixery;
  };

  evaluate =
    modules:
    let
      nixos = import "${nixpkgs}/nixos/lib/eval-config.nix" {
        inherit system;
        modules = [ base ] ++ modules;
      };
      inherit (nixos) config;
      unit = name: config.systemd.units.${name}.text or null;
    in
    {
      toplevel = config.system.build.toplevel.drvPath;
      package = config.services.nixery.package.drvPath;
      configFile = config.services.nixery.configFile.drvPath;
      settings = config.services.nixery.settings;
      service = config.systemd.services.nixery.serviceConfig;
      environment = config.systemd.services.nixery.environment;
      unit = unit "nixery.service";
      gcUnit = unit "nixery-gc.service";
      gcTimer = unit "nixery-gc.timer";
      firewall = config.networking.firewall.allowedTCPPorts;
      allowedUsers = config.nix.settings.allowed-users;
      failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
    };
in
{
  systems = lib.mapAttrs (_: evaluate) variants;
  vmTest = {
    driver = vmTest.driver.drvPath;
    run = vmTest.drvPath;
  };
}
