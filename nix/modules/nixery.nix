{ config, lib, pkgs, ... }:

let
  cfg = config.services.nixery;
in
{
  options.services.nixery = {
    enable = lib.mkEnableOption "Nixery, a container registry that builds images with Nix";
  };

  config = lib.mkIf cfg.enable { };
}
