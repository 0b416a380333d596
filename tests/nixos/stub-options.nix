# The few NixOS options the Nixery module sets, declared with plain types so
# the module evaluates with nixpkgs' `lib` alone (no nixpkgs checkout).
{ lib, ... }:

let
  inherit (lib) mkOption types;
  freeform = types.submodule { freeformType = types.attrsOf types.anything; };
in
{
  options = {
    assertions = mkOption {
      type = types.listOf types.unspecified;
      default = [ ];
    };
    warnings = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    users.users = mkOption {
      type = types.attrsOf freeform;
      default = { };
    };
    users.groups = mkOption {
      type = types.attrsOf freeform;
      default = { };
    };
    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
    };
    # As in NixOS: a list setting whose default lets everyone in.
    nix.settings = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf (types.listOf types.str);
        options.allowed-users = mkOption {
          type = types.listOf types.str;
          default = [ "*" ];
        };
      };
      default = { };
    };
    systemd.tmpfiles.rules = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    systemd.services = mkOption {
      type = types.attrsOf freeform;
      default = { };
    };
    systemd.timers = mkOption {
      type = types.attrsOf freeform;
      default = { };
    };
  };
}
