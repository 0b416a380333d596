# Evaluates nix/modules/nixery.nix with nixpkgs' lib, the stub options and
# packages, and one of ./configurations.nix; returns what the tests check.
#   nix-instantiate --eval --strict --json tests/nixos/eval-module.nix \
#     --argstr libPath /path/to/nixpkgs/lib --argstr name full
{
  libPath,
  name,
}:

let
  lib = import libPath;
  pkgs = import ./stub-pkgs.nix { inherit lib; };
  evaluated = lib.evalModules {
    modules = [
      ./stub-options.nix
      ../../nix/modules/nixery.nix
      (import ./configurations.nix).${name}
      { _module.args.pkgs = pkgs; }
    ];
  };
  inherit (evaluated) config;
  configFile = config.services.nixery.configFile;
  # With the check on, the config file is the check's output, whose input is
  # the rendered file.
  rendered = configFile.env.unchecked or configFile;
in
{
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  service = config.systemd.services.nixery or null;
  gcService = config.systemd.services.nixery-gc or null;
  gcTimer = config.systemd.timers.nixery-gc or null;
  settings = rendered.rendered;
  configFile = "${configFile}";
  renderedFile = "${rendered}";
  checkCommand = configFile.buildCommand or null;
  checkInputs = map toString (configFile.env.nativeBuildInputs or [ ]);
  users = config.users.users;
  groups = config.users.groups;
  firewall = config.networking.firewall.allowedTCPPorts;
  nixSettings = config.nix.settings;
  tmpfiles = config.systemd.tmpfiles.rules;
}
