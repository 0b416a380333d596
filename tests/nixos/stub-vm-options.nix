# The options a NixOS VM test's machine sets besides the module's own.
{ lib, ... }:

let
  inherit (lib) mkOption types;
in
{
  options = {
    virtualisation = mkOption {
      type = types.submodule { freeformType = types.attrsOf types.anything; };
      default = { };
    };
    environment.systemPackages = mkOption {
      type = types.listOf types.anything;
      default = [ ];
    };
  };
}
